-- carpool store, schema version 5 (SQLite): the savings ledger.
-- One row per deferred request answered with usage, inserted in the
-- transaction that stores its result and never updated, so a re-download,
-- a second replica or a restart cannot count a request twice. Rows outlive
-- the request's own retention (`results_ttl`). Money in nano-USD
-- (10^-9 USD), at the realtime price and at the price of the tier that
-- served it; `completed_at` in Unix ms.
CREATE TABLE ledger (
    request_id      TEXT PRIMARY KEY,
    completed_at    INTEGER NOT NULL,
    upstream        TEXT NOT NULL,
    model           TEXT NOT NULL,
    credential_hash TEXT NOT NULL,
    served_by       TEXT NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    realtime_nusd   INTEGER NOT NULL,
    served_nusd     INTEGER NOT NULL
);
CREATE INDEX ledger_by_time ON ledger (completed_at);
