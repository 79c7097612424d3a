-- carpool store, schema version 2 (SQLite): window leases.
-- The process working on a window (upload, job creation, polling and
-- reconciling its job) holds it for a short, renewed time, so a replica
-- sharing the store never works on it at the same time; a lease left by
-- a process that died runs out (see deferral/lease.rs).
ALTER TABLE windows ADD COLUMN lease_owner TEXT;
ALTER TABLE windows ADD COLUMN lease_until INTEGER;
