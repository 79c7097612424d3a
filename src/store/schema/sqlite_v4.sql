-- carpool store, schema version 4 (SQLite): scoping headers.
-- A window's key includes the provider's scoping headers (OpenAI-Organization,
-- OpenAI-Project; see model::Scope, stored as a JSON array, '' for none), so
-- two projects of one key never share a batch; a request keeps its scope (a
-- requeue finds its window by it) and its end-to-end headers (JSON, NULL for
-- none) for a realtime fallback. Rows stored before have no scope.
ALTER TABLE windows ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN forward_headers TEXT;
DROP INDEX windows_one_open;
-- At most one open window per key: the invariant intake relies on.
CREATE UNIQUE INDEX windows_one_open
    ON windows (upstream, credential_hash, scope, endpoint, model) WHERE state = 'open';
