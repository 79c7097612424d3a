//! The durable contract of the deferred path: every operation is one state
//! transition in one transaction, with its allowed-from states checked in
//! SQL (the table is in [`model`]). Nothing a restart needs lives only in
//! memory: open windows, sealed / uploaded / creating / submitted windows and
//! their requests are all read back from here.
//!
//! Owns: the schema, request and window records, the transitions. Does not
//! own: window policy (when to flush: `deferral`), provider calls, waiters.
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

mod error;
pub mod model;
mod ops;
mod outbox;
mod postgres;
mod reads;
mod sqlite;
mod sqlite_checkpoint;
mod sqlite_direct;
mod sqlite_intake;
mod sqlite_resolve;
mod writes;

use std::fmt;

use bytes::Bytes;
use futures_util::stream::BoxStream;

pub use error::StoreError;
pub use model::{DeliveryMode, FlushReason, ResolvedStatus, WindowOutcome, WindowState};
pub use outbox::{event_type, DeliveryRecord, DeliveryState};

use crate::model::{DeliveryId, RequestId, RequestStatus, Scope, ServedBy, WindowId};
use crate::pricing::Charge;
use ops::{Op, Reply};
use outbox::OutboxOp;

/// How long an SDK retry (same credential, endpoint and body) re-attaches to
/// the request it repeats.
pub const DEFAULT_RETRY_HORIZON_MS: i64 = 60 * 60 * 1000;

/// Unix milliseconds to the Unix seconds SPEC's handle shows.
pub fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// Tunables of a store; [`Store::connect`] uses the defaults.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// See [`DEFAULT_RETRY_HORIZON_MS`].
    pub retry_horizon_ms: i64,
    /// SQLite: most commands one group commit may hold.
    pub group_commit_max: usize,
    /// SQLite: connections in the read pool. Postgres: pool size.
    pub pool_size: u32,
    /// Postgres: the schema to use (created if missing); tests isolate by it.
    pub pg_schema: Option<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            retry_horizon_ms: DEFAULT_RETRY_HORIZON_MS,
            group_commit_max: 1024,
            pool_size: 4,
            pg_schema: None,
        }
    }
}

/// Per-key limits of a window (already capped at the dialect's limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLimits {
    pub max_requests: u64,
    pub max_bytes: u64,
}

/// What makes requests share a window, and so a batch job.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WindowKey {
    pub upstream: String,
    pub credential_hash: String,
    /// The provider's scoping headers: windows of two scopes never merge.
    pub scope: Scope,
    pub endpoint: String,
    pub model: String,
}

/// Requests in the unfinished windows of one key (intake's ceilings).
#[derive(Clone, Debug)]
pub struct Pending {
    pub key: WindowKey,
    pub count: u64,
}

/// A deferred request as intake hands it over, validated.
#[derive(Clone)]
pub struct NewRequest {
    pub id: RequestId,
    /// SHA-256 hex of the caller's key: binds the handle.
    pub credential_hash: String,
    pub upstream: String,
    pub endpoint: String,
    pub model: String,
    /// The caller's scoping headers (part of the window key).
    pub scope: Scope,
    /// The caller's end-to-end headers, as `(name, value)`, for a realtime
    /// call made for this request (what a pass-through would have sent).
    pub forward_headers: Vec<(String, String)>,
    /// The caller's JSON, verbatim.
    pub body: Bytes,
    pub body_hash: String,
    pub idempotency_key: Option<String>,
    /// `x-stainless-retry-count` > 0: may re-attach to the request it repeats.
    pub sdk_retry: bool,
    pub mode: DeliveryMode,
    /// Unix ms.
    pub deadline: Option<i64>,
    pub callback_url: Option<String>,
    /// Passthrough auth only: kept on the window until its job is created,
    /// never on the request.
    pub upstream_key: Option<String>,
    pub limits: WindowLimits,
    /// Unix ms.
    pub now: i64,
}

impl NewRequest {
    /// The window this request belongs in.
    pub(crate) fn window_key(&self) -> WindowKey {
        WindowKey {
            upstream: self.upstream.clone(),
            credential_hash: self.credential_hash.clone(),
            scope: self.scope.clone(),
            endpoint: self.endpoint.clone(),
            model: self.window_model().to_owned(),
        }
    }

    /// The model its window is keyed by ([`crate::model::window_model`]).
    pub(crate) fn window_model(&self) -> &str {
        crate::model::window_model(&self.endpoint, &self.model)
    }
}

/// What a lease is on: a window (its upload, job creation, polling and
/// reconciling) or a request (a realtime call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    Window(WindowId),
    Request(RequestId),
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Window(id) => write!(f, "window {id}"),
            Self::Request(id) => write!(f, "request {id}"),
        }
    }
}

/// Everything SPEC's request handle shows, and what workers need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub id: RequestId,
    pub status: RequestStatus,
    pub upstream: String,
    pub endpoint: String,
    pub model: String,
    pub mode: DeliveryMode,
    pub created_at: i64,
    pub submitted_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// The provider's job id.
    pub batch_id: Option<String>,
    pub served_by: Option<ServedBy>,
    pub response_status: Option<u16>,
    /// The upstream's body, verbatim.
    pub response_body: Option<Bytes>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub deadline: Option<i64>,
    pub callback_url: Option<String>,
    pub window_id: Option<WindowId>,
}

/// Where an accepted request landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSlot {
    pub id: WindowId,
    /// Requests and bytes in the window after this one.
    pub count: u64,
    pub bytes: u64,
    pub opened_at: i64,
    /// Set when this request filled the window and sealed it.
    pub sealed: Option<FlushReason>,
}

/// The answer to [`Store::accept`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub record: RequestRecord,
    /// False when an idempotent repeat or an SDK retry re-attached to
    /// `record`, which then already existed.
    pub created: bool,
    /// Only for a created request.
    pub window: Option<WindowSlot>,
    /// The previous open window of the key, sealed because this request did
    /// not fit in it.
    pub sealed_previous: Option<(WindowId, FlushReason)>,
}

/// The answer to [`Store::cancel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled(RequestRecord),
    AlreadyFinal(RequestRecord),
    NotFound,
}

/// An open window as the flusher sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSummary {
    pub id: WindowId,
    pub key: WindowKey,
    pub count: u64,
    pub bytes: u64,
    /// The size limits it was opened with (intake seals it on reaching one).
    pub limits: WindowLimits,
    pub opened_at: i64,
    /// Earliest deadline among its queued members.
    pub earliest_deadline: Option<i64>,
    /// Earliest point halfway between a queued member's acceptance and its
    /// deadline (a member's fallback is never before its midpoint).
    pub earliest_midpoint: Option<i64>,
}

/// A request whose deadline is near, and the state of its window (whether
/// it is in a batch file yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueRequest {
    pub record: RequestRecord,
    pub window: Option<WindowState>,
}

/// A queued window member with a deadline (Unix ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedDeadline {
    pub id: RequestId,
    pub created_at: i64,
    pub deadline: i64,
}

/// Where a page of [`Store::due_requests`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueCursor {
    pub deadline: i64,
    pub id: RequestId,
}

/// A window in any state, with what submission and recovery need.
#[derive(Clone, PartialEq, Eq)]
pub struct WindowRecord {
    pub id: WindowId,
    pub key: WindowKey,
    pub state: WindowState,
    pub count: u64,
    pub bytes: u64,
    pub limits: WindowLimits,
    pub opened_at: i64,
    pub sealed_at: Option<i64>,
    pub flush_reason: Option<FlushReason>,
    /// Passthrough auth only: submits, polls and downloads the window's
    /// job; cleared once the window finishes.
    pub upstream_key: Option<String>,
    pub file_id: Option<String>,
    pub job_id: Option<String>,
    pub provider_status: Option<String>,
    pub submitted_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// One request's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub id: RequestId,
    pub status: ResolvedStatus,
    pub served_by: Option<ServedBy>,
    pub response_status: Option<u16>,
    pub response_body: Option<Bytes>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// Unix ms.
    pub completed_at: i64,
    /// The answer's usage and price, for the savings ledger: written with
    /// the result, once, if the result applies.
    pub charge: Option<Charge>,
}

/// What the savings ledger is summed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerGroup {
    Model,
    Upstream,
    /// The caller's credential hash (named by the HTTP edge).
    Credential,
    /// The UTC day, as days since 1970-01-01 (`"20429"`).
    Day,
}

/// One group of the ledger: requests, tokens and nano-USD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerSum {
    pub group: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub realtime_nusd: i64,
    /// What the answers cost at the tier that served each.
    pub served_nusd: i64,
    /// Requests paid twice: answered one way, their batch line (or
    /// realtime call) paid and answered too.
    pub double_paid: u64,
    /// What the second payments cost, beyond `served_nusd`.
    pub double_paid_nusd: i64,
}

/// Upstream keys never reach a log line, even through `{:?}`.
fn redacted(key: &Option<String>) -> &'static str {
    match key {
        Some(_) => "Some(<redacted>)",
        None => "None",
    }
}

impl fmt::Debug for NewRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewRequest")
            .field("id", &self.id)
            .field("upstream", &self.upstream)
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("scope", &self.scope)
            .field("body_len", &self.body.len())
            .field("idempotency_key", &self.idempotency_key)
            .field("sdk_retry", &self.sdk_retry)
            .field("mode", &self.mode)
            .field("deadline", &self.deadline)
            .field("upstream_key", &redacted(&self.upstream_key))
            .field("limits", &self.limits)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for WindowRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowRecord")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("state", &self.state)
            .field("count", &self.count)
            .field("bytes", &self.bytes)
            .field("limits", &self.limits)
            .field("opened_at", &self.opened_at)
            .field("sealed_at", &self.sealed_at)
            .field("flush_reason", &self.flush_reason)
            .field("upstream_key", &redacted(&self.upstream_key))
            .field("file_id", &self.file_id)
            .field("job_id", &self.job_id)
            .field("provider_status", &self.provider_status)
            .field("submitted_at", &self.submitted_at)
            .field("finished_at", &self.finished_at)
            .finish()
    }
}

/// The store: cheap to clone, one interface over every backend.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Sqlite(s) => s.$method($($arg),*).await,
            Store::Postgres(s) => s.$method($($arg),*).await,
        }
    };
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

    // ---- intake -----------------------------------------------------------

    /// Commits a deferred request into the open window of its key (one
    /// transaction), or re-attaches an idempotent repeat / SDK retry.
    pub async fn accept(&self, req: NewRequest) -> Result<Accepted, StoreError> {
        self.write(Op::Accept(Box::new(req))).await?.accepted()
    }

    // ---- reads ------------------------------------------------------------

    /// The request, if it exists and belongs to this credential.
    pub async fn get(
        &self,
        id: &RequestId,
        credential_hash: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        dispatch!(self.get(id, credential_hash))
    }

    /// The credential's requests, newest first, strictly older than `after`.
    pub async fn list(
        &self,
        credential_hash: &str,
        status: Option<RequestStatus>,
        limit: u32,
        after: Option<&RequestId>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        dispatch!(self.list(credential_hash, status, limit, after))
    }

    /// The caller's original body (for a realtime fallback). Internal: no
    /// credential check.
    pub async fn request_body(&self, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
        dispatch!(self.request_body(id))
    }

    /// The caller's end-to-end headers stored with the request (for a
    /// realtime fallback); empty for none. Internal: no credential check.
    pub async fn request_headers(
        &self,
        id: &RequestId,
    ) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self.request_headers(id))
    }

    /// Open (queued or submitted) requests whose deadline is at or before
    /// `before`, earliest first (by deadline, then id), from just past
    /// `after`: a page at a time, so requests a pass leaves alone never
    /// hide the ones behind them.
    pub async fn due_requests(
        &self,
        before: i64,
        after: Option<&DueCursor>,
        limit: u32,
    ) -> Result<Vec<DueRequest>, StoreError> {
        dispatch!(self.due_requests(before, after, limit))
    }

    /// The queued members of a window that have a deadline, earliest first.
    pub async fn queued_deadlines(
        &self,
        window: &WindowId,
    ) -> Result<Vec<QueuedDeadline>, StoreError> {
        dispatch!(self.queued_deadlines(window))
    }

    /// Ids of the still open requests of a window.
    pub async fn open_request_ids(&self, window: &WindowId) -> Result<Vec<RequestId>, StoreError> {
        dispatch!(self.open_request_ids(window))
    }

    // ---- cancel -----------------------------------------------------------

    /// Cancels a queued or submitted request of this credential. A queued one
    /// leaves its window's count and bytes and is never submitted.
    pub async fn cancel(
        &self,
        id: &RequestId,
        credential_hash: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        self.write(Op::Cancel {
            id: id.clone(),
            credential_hash: credential_hash.to_owned(),
            now,
        })
        .await?
        .cancel()
    }

    // ---- windows ----------------------------------------------------------

    /// Whether the store answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self.ping())
    }

    pub async fn open_windows(&self) -> Result<Vec<WindowSummary>, StoreError> {
        dispatch!(self.open_windows())
    }

    /// Stored requests per status (statuses with none are absent).
    pub async fn request_counts(&self) -> Result<Vec<(RequestStatus, u64)>, StoreError> {
        dispatch!(self.request_counts())
    }

    pub async fn window(&self, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
        dispatch!(self.window(id))
    }

    /// Windows in any of these states, oldest first.
    pub async fn windows_in(
        &self,
        states: &[WindowState],
    ) -> Result<Vec<WindowRecord>, StoreError> {
        dispatch!(self.windows_in(states))
    }

    /// open → sealed; false if it was not open.
    pub async fn seal_window(
        &self,
        id: &WindowId,
        reason: FlushReason,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Seal {
            id: id.clone(),
            reason,
            now,
        })
        .await?
        .applied()
    }

    /// The window's still open requests as `(custom_id, body)`, in a stable
    /// order, read page by page: memory does not grow with the window.
    pub fn window_lines(
        &self,
        id: &WindowId,
    ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
        match self {
            Store::Sqlite(s) => s.window_lines(id.clone()),
            Store::Postgres(s) => s.window_lines(id.clone()),
        }
    }

    /// sealed → uploaded.
    pub async fn record_upload(&self, id: &WindowId, file_id: &str) -> Result<bool, StoreError> {
        self.write(Op::RecordUpload {
            id: id.clone(),
            file_id: file_id.to_owned(),
        })
        .await?
        .applied()
    }

    /// uploaded → creating: stored before the provider create call, so
    /// recovery knows to look for the job by the window id in its metadata.
    pub async fn mark_creating(&self, id: &WindowId) -> Result<bool, StoreError> {
        self.write(Op::MarkCreating { id: id.clone() })
            .await?
            .applied()
    }

    /// Leases `on` to `owner` until `until`, if nobody else holds an
    /// unexpired lease on it; the holder renews its own. A window is
    /// leased only on its way to a job or with one running (sealed,
    /// uploaded, creating or submitted); its holder renews in any state.
    /// Replicas sharing the store take turns this way (`deferral::lease`).
    pub async fn claim_lease(
        &self,
        on: &Lease,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::ClaimLease {
            on: on.clone(),
            owner: owner.to_owned(),
            now,
            until,
        })
        .await?
        .applied()
    }

    /// Gives up `owner`'s lease on `on` (false if it no longer held it).
    pub async fn release_lease(&self, on: &Lease, owner: &str) -> Result<bool, StoreError> {
        self.write(Op::ReleaseLease {
            on: on.clone(),
            owner: owner.to_owned(),
        })
        .await?
        .applied()
    }

    /// Gives up every lease `owner` holds (a process on its way out, so the
    /// next one need not wait for them to run out); returns how many.
    pub async fn release_leases_of(&self, owner: &str) -> Result<u64, StoreError> {
        self.write(Op::ReleaseLeasesOf {
            owner: owner.to_owned(),
        })
        .await?
        .count()
    }

    /// creating → submitted; its queued requests become submitted with this
    /// batch id; the upstream key is forgotten.
    pub async fn record_job(
        &self,
        id: &WindowId,
        job_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::RecordJob {
            id: id.clone(),
            job_id: job_id.to_owned(),
            now,
        })
        .await?
        .applied()
    }

    /// creating or submitted → sealed: the provider refused the window's
    /// job for its enqueued-token quota, so no job runs; the file and job
    /// ids are forgotten and its submitted requests are queued again, to
    /// be submitted once quota allows. Not a resubmission.
    pub async fn return_to_sealed(&self, id: &WindowId) -> Result<bool, StoreError> {
        self.write(Op::ReturnToSealed { id: id.clone() })
            .await?
            .applied()
    }

    /// The provider's last reported status of a submitted window's job.
    pub async fn record_job_status(
        &self,
        id: &WindowId,
        provider_status: &str,
    ) -> Result<bool, StoreError> {
        self.write(Op::RecordJobStatus {
            id: id.clone(),
            status: provider_status.to_owned(),
        })
        .await?
        .applied()
    }

    /// → completed (from submitted, or sealed when empty) or → failed.
    pub async fn finish_window(
        &self,
        id: &WindowId,
        outcome: WindowOutcome,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Finish {
            id: id.clone(),
            outcome,
            now,
        })
        .await?
        .applied()
    }

    // ---- results ----------------------------------------------------------

    /// Applies each result whose request is still open and still in this
    /// window; returns the ids that changed (wake each waiter once).
    pub async fn resolve(
        &self,
        window: &WindowId,
        resolutions: Vec<Resolution>,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Resolve {
            window: window.clone(),
            resolutions,
        })
        .await?
        .ids()
    }

    /// A realtime fallback's result: applied if the request is still open.
    pub async fn resolve_one(&self, resolution: Resolution) -> Result<bool, StoreError> {
        self.write(Op::ResolveOne(Box::new(resolution)))
            .await?
            .applied()
    }

    /// Fails every still open request of the window ("in neither file").
    pub async fn fail_unresolved(
        &self,
        window: &WindowId,
        code: &str,
        message: &str,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::FailUnresolved {
            window: window.clone(),
            code: code.to_owned(),
            message: message.to_owned(),
            now,
        })
        .await?
        .ids()
    }

    /// Moves open requests back to queued in the open window of their key
    /// (opened if none), for resubmission, counting one resubmission each.
    /// Returns the ids moved. The new window takes the old one's upstream
    /// key when it has none.
    pub async fn requeue(
        &self,
        ids: Vec<RequestId>,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Requeue {
            ids,
            now,
            counted: true,
        })
        .await?
        .ids()
    }

    /// [`Store::requeue`] without counting a resubmission: for requests
    /// whose batch was refused for another request's line.
    pub async fn requeue_uncounted(
        &self,
        ids: Vec<RequestId>,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Requeue {
            ids,
            now,
            counted: false,
        })
        .await?
        .ids()
    }

    // ---- failure policies: resubmission, openness, pending counts ----

    /// After a window's job failed, expired or was cancelled: requeues each of
    /// its still open requests resubmitted fewer than `limit` times (counting
    /// one more for each), into the open window of its key, which inherits
    /// the old window's upstream key. Returns the ids moved; the others stay
    /// open in `window` for the next policy.
    pub async fn resubmit(
        &self,
        window: &WindowId,
        limit: u32,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Resubmit {
            window: window.clone(),
            limit,
            now,
        })
        .await?
        .ids()
    }

    /// Whether the request is still open (queued or submitted). Internal: no
    /// credential check.
    pub async fn is_open(&self, id: &RequestId) -> Result<bool, StoreError> {
        dispatch!(self.is_open(id))
    }

    /// Requests counted in unfinished windows, per credential hash and
    /// window key (an estimate that can only run high: members answered
    /// early, e.g. by a realtime fallback, count until their window finishes).
    pub async fn pending_by_credential(&self) -> Result<Vec<Pending>, StoreError> {
        dispatch!(self.pending_by_credential())
    }

    /// The savings ledger summed by `by`, over results completed in
    /// `[from, to)` (Unix ms).
    pub async fn ledger(
        &self,
        by: LedgerGroup,
        from: i64,
        to: i64,
    ) -> Result<Vec<LedgerSum>, StoreError> {
        dispatch!(self.ledger(by, from, to))
    }

    /// Deletes requests finished before `older_than` (results_ttl) and
    /// finished windows; returns the number of requests deleted.
    pub async fn purge_finished(&self, older_than: i64) -> Result<u64, StoreError> {
        self.write(Op::Purge { older_than }).await?.count()
    }

    // ---- webhook outbox (outbox.rs) ---------------------------------------
    // A delivery is enqueued by `resolve`, `resolve_one`, `fail_unresolved`
    // and `cancel` themselves, in their transaction, for a request with a
    // callback URL.

    /// Claims up to `limit` due deliveries for one attempt each: their
    /// attempt count goes up by one and they are leased until `lease_until`
    /// (due again then if the attempt never reports).
    pub async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.write(Op::Outbox(OutboxOp::Claim {
            now,
            lease_until,
            limit,
        }))
        .await?
        .deliveries()
    }

    /// pending → delivered.
    pub async fn delivery_succeeded(
        &self,
        id: &DeliveryId,
        status: u16,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Delivered {
            id: id.clone(),
            status,
            now,
        }))
        .await?
        .applied()
    }

    /// Schedules the next attempt after a failed `attempt` (ignored if the
    /// delivery was claimed again since).
    pub async fn delivery_retry(
        &self,
        id: &DeliveryId,
        attempt: u32,
        next_at: i64,
        status: Option<u16>,
        error: &str,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Retry {
            id: id.clone(),
            attempt,
            next_at,
            status,
            error: error.to_owned(),
        }))
        .await?
        .applied()
    }

    /// Gives back the claim of `attempt` without making it (its target host
    /// had enough attempts in flight): not counted, due again at `next_at`.
    pub async fn delivery_release(
        &self,
        id: &DeliveryId,
        attempt: u32,
        next_at: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Release {
            id: id.clone(),
            attempt,
            next_at,
        }))
        .await?
        .applied()
    }

    /// pending → dead (a dead letter), with the reason.
    pub async fn delivery_dead(
        &self,
        id: &DeliveryId,
        attempt: u32,
        status: Option<u16>,
        reason: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Dead {
            id: id.clone(),
            attempt,
            status,
            reason: reason.to_owned(),
            now,
        }))
        .await?
        .applied()
    }

    /// dead → pending with a fresh attempt count, due at `now`; false if it
    /// is not a dead letter.
    pub async fn replay_dead_letter(&self, id: &DeliveryId, now: i64) -> Result<bool, StoreError> {
        self.write(Op::Outbox(OutboxOp::Replay {
            id: id.clone(),
            now,
        }))
        .await?
        .applied()
    }

    /// Every dead letter → pending; returns how many.
    pub async fn replay_dead_letters(&self, now: i64) -> Result<u64, StoreError> {
        self.write(Op::Outbox(OutboxOp::ReplayAll { now }))
            .await?
            .count()
    }

    /// Dead letters, most recently dead first.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeliveryRecord>, StoreError> {
        dispatch!(self.dead_letters(limit))
    }

    pub async fn delivery(&self, id: &DeliveryId) -> Result<Option<DeliveryRecord>, StoreError> {
        dispatch!(self.delivery(id))
    }

    /// The number of pending deliveries and the earliest `next_attempt_at`.
    pub async fn outbox_pending(&self) -> Result<(u64, Option<i64>), StoreError> {
        dispatch!(self.outbox_pending())
    }

    /// A request by id alone. Internal: no credential check.
    pub async fn request_by_id(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        dispatch!(self.request_by_id(id))
    }
}
