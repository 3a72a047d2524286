-- Stored answers of idempotent requests are kept for CLINIC_IDEMPOTENCY_KEY_TTL_HOURS, then
-- pruned by the relay role oldest first: an index on their age keeps that cheap.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
