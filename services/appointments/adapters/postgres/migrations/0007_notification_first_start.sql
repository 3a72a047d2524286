-- When the notification service first started consuming with this database, by its own
-- clock: the events since then are news it owes, a booking's confirmation however late it
-- applies it (after an outage of the service, for days maybe); older ones are the history
-- a first start inherits, confirmed only while fresh (within stale_after). One row, never
-- moved: written insert-if-absent by every consumer as it starts, the first one wins. No
-- row (a fresh or rebuilt database) means no start yet: a first start.
CREATE TABLE notification_first_start (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    started_at timestamptz NOT NULL
);

-- A database the service already consumes with: from the first event it applied, so an
-- outage of the service that spans this release is owed its confirmations too.
INSERT INTO notification_first_start (started_at)
SELECT min(processed_at) FROM notification_processed_events
HAVING min(processed_at) IS NOT NULL;
