-- carpool store, schema version 1 (SQLite). Times are Unix milliseconds.
CREATE TABLE windows (
    id              TEXT PRIMARY KEY,
    upstream        TEXT NOT NULL,
    credential_hash TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    state           TEXT NOT NULL,
    count           INTEGER NOT NULL DEFAULT 0,
    bytes           INTEGER NOT NULL DEFAULT 0,
    max_requests    INTEGER NOT NULL,
    max_bytes       INTEGER NOT NULL,
    opened_at       INTEGER NOT NULL,
    sealed_at       INTEGER,
    flush_reason    TEXT,
    upstream_key    TEXT,
    file_id         TEXT,
    job_id          TEXT,
    provider_status TEXT,
    submitted_at    INTEGER,
    finished_at     INTEGER
);
-- At most one open window per key: the invariant intake relies on.
CREATE UNIQUE INDEX windows_one_open
    ON windows (upstream, credential_hash, endpoint, model) WHERE state = 'open';
CREATE INDEX windows_by_state ON windows (state);

CREATE TABLE requests (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    credential_hash TEXT NOT NULL,
    upstream        TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    model           TEXT NOT NULL,
    body            BLOB NOT NULL,
    body_hash       TEXT NOT NULL,
    idempotency_key TEXT,
    mode            TEXT NOT NULL,
    deadline        INTEGER,
    callback_url    TEXT,
    status          TEXT NOT NULL,
    window_id       TEXT,
    created_at      INTEGER NOT NULL,
    submitted_at    INTEGER,
    completed_at    INTEGER,
    batch_id        TEXT,
    served_by       TEXT,
    response_status INTEGER,
    response_body   BLOB,
    error_code      TEXT,
    error_message   TEXT,
    -- See ops::retry_tag: what an SDK retry is found by.
    retry_tag       INTEGER NOT NULL
);
CREATE UNIQUE INDEX requests_idempotency
    ON requests (credential_hash, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX requests_retry ON requests (retry_tag);
CREATE INDEX requests_by_window ON requests (window_id, seq);
CREATE INDEX requests_by_credential ON requests (credential_hash, seq);
CREATE INDEX requests_open_deadline ON requests (deadline)
    WHERE deadline IS NOT NULL AND status IN ('queued', 'submitted');
-- The flusher's "earliest deadline of each open window", without a scan.
CREATE INDEX requests_window_deadline ON requests (window_id, deadline)
    WHERE deadline IS NOT NULL AND status = 'queued';
CREATE INDEX requests_finished ON requests (completed_at) WHERE completed_at IS NOT NULL;

-- ---- failure policies ----
-- Times a request was put back in a window after its batch failed, expired
-- or was cancelled; `on_batch_failure = "resubmit"` stops at resubmit_limit.
ALTER TABLE requests ADD COLUMN resubmits INTEGER NOT NULL DEFAULT 0;

-- ---- webhook outbox (src/store/outbox.rs) --------------------------------
-- One row per request with a callback that reached a final state, written
-- in the transaction that finished the request. `next_attempt_at` is both
-- the schedule and the lease of a claimed attempt.
CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY,
    request_id      TEXT NOT NULL,
    url             TEXT NOT NULL,
    event           TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER,
    last_status     INTEGER,
    last_error      TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (finished_at, id)
    WHERE state = 'dead';
