-- The W3C traceparent of the span that recorded each event (the command's), so that the
-- relay's publish span continues the request's trace. NULL: recorded outside any trace
-- (or before this migration); the relay then derives one from the correlation id.
ALTER TABLE events ADD COLUMN traceparent text;
