-- The write side: events (the only source of truth), the outbox the relay drains,
-- the provider double-booking guard, and stored answers of idempotent requests.
CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    stream_id       uuid        NOT NULL,
    stream_version  integer     NOT NULL CHECK (stream_version > 0),
    clinic_id       uuid        NOT NULL,
    type            text        NOT NULL,
    schema_version  integer     NOT NULL,
    data            jsonb       NOT NULL,
    occurred_at     timestamptz NOT NULL,
    correlation_id  uuid,
    causation_id    uuid,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

-- One row per committed event not yet published; the relay deletes what JetStream acked.
CREATE TABLE outbox (
    global_position bigint PRIMARY KEY
);

-- Active (scheduled or started) appointments' time ranges; freed on cancel.
CREATE TABLE provider_bookings (
    appointment_id uuid      PRIMARY KEY,
    clinic_id      uuid      NOT NULL,
    provider_id    uuid      NOT NULL,
    during         tstzrange NOT NULL,
    CONSTRAINT provider_bookings_no_overlap
        EXCLUDE USING gist (clinic_id WITH =, provider_id WITH =, during WITH &&)
);

CREATE TABLE idempotency_keys (
    principal_id      uuid        NOT NULL,
    key               text        NOT NULL,
    fingerprint       text        NOT NULL,
    status            smallint    NOT NULL,
    body              bytea       NOT NULL,
    consistency_token text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (principal_id, key)
);
