-- The read side: the visits view the projector maintains from the APPOINTMENTS stream,
-- its checkpoint, and the messages it parked.
--
-- A row holds what the read-time rules need (times, appointment status) and the
-- appointment's stream `version` it reflects: an event at version <= version is a
-- redelivery (skipped), one at version > version + 1 is early (retried later).
CREATE TABLE visits (
    appointment_id   uuid        PRIMARY KEY,
    clinic_id        uuid        NOT NULL,
    patient_id       uuid        NOT NULL,
    provider_id      uuid        NOT NULL,
    starts_at        timestamptz NOT NULL,
    ends_at          timestamptz NOT NULL,
    duration_minutes integer     NOT NULL,
    timezone         text        NOT NULL,
    visit_reason     text,
    status           text        NOT NULL
        CHECK (status IN ('scheduled', 'cancelled', 'started')),
    version          integer     NOT NULL CHECK (version > 0),
    -- Not cancelled. A key column of every index, so that each tab's query is one index
    -- range: Upcoming reads active rows from `now - longest visit`, Past merges the
    -- cancelled rows with the active rows that started before now.
    active           boolean     GENERATED ALWAYS AS (status <> 'cancelled') STORED
);

-- One per role scope: the patient's visits, the provider's, the whole clinic's (staff).
CREATE INDEX visits_patient_idx ON visits (clinic_id, patient_id, active, starts_at, appointment_id);
CREATE INDEX visits_provider_idx ON visits (clinic_id, provider_id, active, starts_at, appointment_id);
CREATE INDEX visits_clinic_idx ON visits (clinic_id, active, starts_at, appointment_id);

-- How far each projection has read its stream (written with the view change it made).
CREATE TABLE projection_checkpoints (
    projection      text        PRIMARY KEY,
    stream_sequence bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Messages a projection could not apply (undecodable, or never applicable): kept for an
-- operator, terminated on the stream so they never block the consumer.
CREATE TABLE parked_messages (
    projection      text        NOT NULL,
    stream_sequence bigint      NOT NULL,
    subject         text        NOT NULL,
    data            bytea       NOT NULL,
    reason          text        NOT NULL,
    deliveries      integer     NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, stream_sequence)
);
