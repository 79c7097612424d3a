//! The store layer's one error enum. Connection strings and upstream keys
//! never appear in it.

/// What can go wrong in a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller reused an idempotency key with a different body (SPEC: 422).
    #[error("idempotency key was already used with a different request body")]
    IdempotencyConflict,
    /// `Store::connect` was given a URL it cannot serve.
    #[error("unsupported store url scheme {scheme:?} (expected sqlite:// or postgres://)")]
    UnsupportedUrl { scheme: String },
    /// The database refused or failed an operation.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite refused or failed a statement the writer ran through its C
    /// API (`sqlite_direct`: intake's inserts, a window's results).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A Postgres schema name outside `[a-z0-9_]{1,63}`.
    #[error("invalid postgres schema name {name:?}")]
    BadSchemaName { name: String },
    /// A row holds a value this version cannot read back.
    #[error("stored {column} has an unknown value {value:?}")]
    Corrupt { column: &'static str, value: String },
    /// A backend answered a write with the wrong kind of reply (a bug).
    #[error("the store answered {op} with the wrong kind of reply")]
    ReplyMismatch { op: &'static str },
    /// The SQLite writer task has stopped (the store is shutting down).
    #[error("the store writer has stopped")]
    WriterGone,
    /// The folder of a SQLite database could not be created.
    #[error("cannot create the store's folder {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    /// The SQLite writer's thread could not be started.
    #[error("cannot start the store writer thread: {0}")]
    WriterThread(std::io::Error),
}

impl StoreError {
    /// Whether trying the same operation again may succeed (lock contention,
    /// a dropped connection), as opposed to a verdict on the input.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || is_retryable_db(e)
            }
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            Self::WriterGone => true,
            Self::IdempotencyConflict
            | Self::UnsupportedUrl { .. }
            | Self::BadSchemaName { .. }
            | Self::Corrupt { .. }
            | Self::ReplyMismatch { .. }
            | Self::CreateDir { .. }
            | Self::WriterThread(_) => false,
        }
    }

    /// Errors an operation decides before it writes anything: a group commit
    /// can keep the other commands of its transaction.
    pub(crate) fn wrote_nothing(&self) -> bool {
        matches!(self, Self::IdempotencyConflict)
    }
}

/// Busy / locked (SQLite), serialization failure, deadlock or unique
/// violation from a concurrent writer (Postgres).
pub(crate) fn is_retryable_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("5" | "6" | "40001" | "40P01" | "23505")
        ),
        _ => false,
    }
}
