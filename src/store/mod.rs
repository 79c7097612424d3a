//! The durable contract of the deferred path: every operation is one state
//! transition in one transaction, with its allowed-from states checked in
//! SQL (the table is in [`model`]). Nothing a restart needs lives only in
//! memory: open windows, sealed / uploaded / creating / submitted windows and
//! their requests are all read back from here.
//!
//! Owns: the schema, request and window records, the transitions. Does not
//! own: window policy (when to flush: `deferral`), provider calls, waiters.
//!
//! Layout: [`records`] holds the data the store takes and gives; one facade
//! file per concern holds the methods on [`Store`] (`intake`, `windows`,
//! `leases`, `results`, `outbox`); the backends sit behind them.
//!
//! Backends: SQLite (embedded default; one writer task group-commits every
//! write, reads use a separate pool) and Postgres (several replicas share it;
//! every transition is a conditional UPDATE, retried on conflicts). Both run
//! the same SQL from `ops.rs` (the SQLite writer batches a group's accepts
//! in `sqlite_intake.rs` with the same rules), and `tests/store.rs` runs one
//! contract suite against each.
//!
//! Times in this API are Unix **milliseconds**; [`secs`] converts for the
//! SPEC's handle fields.

// The facades below dispatch through it: defined before their `mod` lines.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Sqlite(s) => s.$method($($arg),*).await,
            Store::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

mod error;
mod intake;
mod leases;
pub mod model;
mod ops;
mod outbox;
mod postgres;
mod reads;
mod records;
mod results;
mod sqlite;
mod sqlite_checkpoint;
mod sqlite_direct;
mod sqlite_intake;
mod sqlite_resolve;
mod windows;
mod writes;

pub use error::StoreError;
pub use model::{DeliveryMode, FlushReason, ResolvedStatus, WindowOutcome, WindowState};
pub use outbox::{event_type, DeliveryRecord, DeliveryState};
pub use records::{
    secs, Accepted, CancelOutcome, DueCursor, DueRequest, Lease, LedgerGroup, LedgerSum,
    NewRequest, Pending, QueuedDeadline, RequestRecord, Resolution, StoreOptions, WindowKey,
    WindowLimits, WindowRecord, WindowSlot, WindowSummary, DEFAULT_RETRY_HORIZON_MS,
};

use crate::model::RequestId;
use ops::{Op, Reply};

/// The store: cheap to clone, one interface over every backend.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// `sqlite://path` (file created, WAL, `synchronous=FULL`) or
    /// `postgres://…`; the schema is created or migrated.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Self::connect_with(url, StoreOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        let scheme = url.split_once(':').map_or(url, |(s, _)| s);
        match scheme {
            "sqlite" => Ok(Store::Sqlite(
                sqlite::SqliteStore::connect(url, options).await?,
            )),
            "postgres" | "postgresql" => Ok(Store::Postgres(
                postgres::PgStore::connect(url, options).await?,
            )),
            other => Err(StoreError::UnsupportedUrl {
                scheme: other.to_owned(),
            }),
        }
    }

    /// Calls `wake` with the ids of requests that other replicas sharing
    /// this store finished, as they commit, until `shutdown`; `listening`
    /// says when it starts and stops hearing them. SQLite has no other
    /// replicas: it returns at once.
    pub async fn follow_finished(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
        listening: &(dyn Fn(bool) + Send + Sync),
        wake: &(dyn Fn(&[RequestId]) + Send + Sync),
    ) {
        match self {
            Store::Sqlite(_) => {}
            Store::Postgres(s) => s.follow_finished(shutdown, listening, wake).await,
        }
    }

    /// Stops the SQLite writer after the commands already sent and closes the
    /// pools. Dropping every clone has the same effect, less promptly.
    pub async fn close(&self) {
        dispatch!(self.close())
    }

    async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        dispatch!(self.write(op))
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self.ping())
    }
}
