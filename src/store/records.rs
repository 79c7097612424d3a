//! The records the store takes and gives: what intake hands over, what the
//! handle API and the workers read back, and the small value types of
//! windows, leases, results and the ledger. Plain data; no SQL.

use std::fmt;

use bytes::Bytes;

use super::{DeliveryMode, FlushReason, ResolvedStatus, WindowState};
use crate::model::{RequestId, RequestStatus, Scope, ServedBy, WindowId};
use crate::pricing::Charge;

/// How long an SDK retry (same credential, endpoint and body) re-attaches to
/// the request it repeats.
pub const DEFAULT_RETRY_HORIZON_MS: i64 = 60 * 60 * 1000;

/// Unix milliseconds to the Unix seconds SPEC's handle shows.
pub fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// Tunables of a store; [`super::Store::connect`] uses the defaults.
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

/// The answer to [`super::Store::accept`].
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

/// The answer to [`super::Store::cancel`].
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

/// Where a page of [`super::Store::due_requests`] ended.
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
