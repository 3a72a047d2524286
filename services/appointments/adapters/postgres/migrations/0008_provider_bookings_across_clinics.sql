-- A provider cannot be double-booked (domain.md): two active appointments of the same
-- provider may not overlap in time, whichever clinic booked them. The guard of 0001 keyed
-- the provider within its clinic, so a provider who works for two clinics could be booked
-- twice at once; it now keys the provider alone. One column fewer also makes every
-- booking's insert into the GiST index cheaper (fewer penalties to weigh on each page).
-- Rebuilding the index holds an exclusive lock on provider_bookings (appends wait) for the
-- time it takes to index the active bookings; it fails, and nothing changes, if a provider
-- is already booked twice at once across clinics.
ALTER TABLE provider_bookings DROP CONSTRAINT IF EXISTS provider_bookings_no_overlap;
ALTER TABLE provider_bookings ADD CONSTRAINT provider_bookings_no_overlap
    EXCLUDE USING gist (provider_id WITH =, during WITH &&);
