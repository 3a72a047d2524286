-- The notification service forgets a visit CLINIC_NOTIFICATION_RETENTION_DAYS after its end
-- (services/notifications/retention.py): its appointments are found by their start, the
-- marks of their processed events by appointment.
CREATE INDEX notification_appointments_starts_at_idx ON notification_appointments (starts_at);
CREATE INDEX notification_processed_events_appointment_idx
    ON notification_processed_events (appointment_id);
