-- How far a 'sending' delivery got, so that a worker killed mid-batch loses nothing:
-- 'claimed' when a worker claims it (not handed to the channel yet: safe to send again
-- once the lease runs out), 'handing-over' written durably just before the email is
-- handed to the SMTP server (from then on it may arrive: in doubt, never resent). NULL on
-- rows claimed before this migration, or by a release that does not write it: in doubt,
-- as every abandoned delivery was before. A nullable column without a default: no rewrite.
ALTER TABLE notification_deliveries ADD COLUMN sending_phase text
    CONSTRAINT notification_deliveries_sending_phase_check
    CHECK (sending_phase IN ('claimed', 'handing-over'));
