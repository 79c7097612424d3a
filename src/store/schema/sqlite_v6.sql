-- carpool store, schema version 6 (SQLite): a request paid twice.
-- A request answered realtime while its line was in a live batch (the
-- deadline rule's counted double payment) keeps its ledger row; when the
-- batch line comes back anyway, its cost as served is added here, once.
ALTER TABLE ledger ADD COLUMN double_paid_nusd INTEGER NOT NULL DEFAULT 0;
