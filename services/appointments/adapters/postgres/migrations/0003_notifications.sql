-- The notification service: what it knows of each appointment, the notifications it
-- decided to send (at most one per cause, kind and recipient), their deliveries per
-- channel (an outbox the delivery workers drain), the reminder timers, the events it has
-- processed (its checkpoint, written in the same transaction as its output) and the
-- messages it parked.

-- The appointment as far as notifications need it (recipients, time, zone, status).
CREATE TABLE notification_appointments (
    appointment_id   uuid        PRIMARY KEY,
    clinic_id        uuid        NOT NULL,
    patient_id       uuid        NOT NULL,
    provider_id      uuid        NOT NULL,
    starts_at        timestamptz NOT NULL,
    duration_minutes integer     NOT NULL,
    timezone         text        NOT NULL,
    status           text        NOT NULL
        CHECK (status IN ('scheduled', 'cancelled', 'started')),
    scheduled_event_id uuid      NOT NULL
);

-- The id is uuid5(cause_event_id, kind, recipient_id): a redelivered or replayed cause
-- computes the same id, and the unique constraint says the same once more in SQL.
CREATE TABLE notifications (
    notification_id uuid        PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN (
        'appointment-confirmed', 'appointment-cancelled', 'reminder-24h', 'visit-ready')),
    recipient_id    uuid        NOT NULL,
    recipient_role  text        NOT NULL CHECK (recipient_role IN ('patient', 'provider', 'staff')),
    appointment_id  uuid        NOT NULL,
    clinic_id       uuid        NOT NULL,
    cause_event_id  uuid        NOT NULL,
    title           text        NOT NULL,
    body            text        NOT NULL,
    created_at      timestamptz NOT NULL,
    CONSTRAINT notifications_once UNIQUE (cause_event_id, kind, recipient_id)
);
CREATE INDEX notifications_appointment_idx ON notifications (appointment_id);

-- One row per notification and channel. A worker claims due rows (pending, or 'sending'
-- whose lease ran out: the worker died mid-send) with FOR UPDATE SKIP LOCKED, marks them
-- 'sending' until next_attempt_at (the lease), sends, then records the outcome.
CREATE TABLE notification_deliveries (
    notification_id uuid        NOT NULL REFERENCES notifications ON DELETE CASCADE,
    channel         text        NOT NULL CHECK (channel IN ('push', 'email')),
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    claimed_at      timestamptz,
    sent_at         timestamptz,
    last_error      text,
    PRIMARY KEY (notification_id, channel)
);
CREATE INDEX notification_deliveries_due_idx
    ON notification_deliveries (channel, next_attempt_at)
    WHERE status IN ('pending', 'sending');

-- Reminders not yet due. Deleted when fired, and when the appointment is cancelled or
-- started; one that fires after expires_at is dropped instead of being sent late.
CREATE TABLE notification_timers (
    appointment_id uuid        NOT NULL
        REFERENCES notification_appointments ON DELETE CASCADE,
    kind           text        NOT NULL CHECK (kind IN ('reminder-24h', 'visit-ready')),
    cause_event_id uuid        NOT NULL,
    due_at         timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (appointment_id, kind)
);
CREATE INDEX notification_timers_due_idx ON notification_timers (due_at);

-- Every event the consumer has applied: a redelivery or replay finds its mark and changes
-- nothing. Kept as long as the APPOINTMENTS stream can replay the event.
CREATE TABLE notification_processed_events (
    event_id        uuid        PRIMARY KEY,
    appointment_id  uuid        NOT NULL,
    stream_sequence bigint      NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now()
);

-- Messages the consumer could not apply (undecodable, or never applicable): terminated on
-- the stream so they never block it, and kept here for an operator.
CREATE TABLE notification_parked_messages (
    stream_sequence bigint      PRIMARY KEY,
    subject         text        NOT NULL,
    data            bytea       NOT NULL,
    reason          text        NOT NULL,
    deliveries      integer     NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now()
);
