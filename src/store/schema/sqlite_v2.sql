-- carpool store, schema version 2 (SQLite): window leases.
-- The process submitting a sealed window holds it for a short, renewed
-- time (see deferral/flusher.rs), so a replica sharing the store never
-- uploads it or creates its job at the same time; a lease left by a
-- process that died runs out.
ALTER TABLE windows ADD COLUMN lease_owner TEXT;
ALTER TABLE windows ADD COLUMN lease_until INTEGER;
