-- carpool store, schema version 3 (Postgres): request leases.
-- The process sending a request realtime (its deadline came, or its batch
-- failed) holds it for a short, renewed time, so a replica sharing the
-- store never sends it too (see deferral/lease.rs). A row lives while its
-- holder works; one left by a process that died runs out.
CREATE TABLE request_leases (
    request_id TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    until      BIGINT NOT NULL
);
