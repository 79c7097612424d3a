//! The writes as data ([`Op`], [`Reply`]), the pure rules they share, and
//! the per-backend compilation of the SQL in `writes.rs` and `reads.rs`
//! (written once: `$N` placeholders and types both SQLite and Postgres
//! accept).

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::model::{request_from_sql, returned_from_sql, window_from_sql};
use super::outbox::{DeliveryRecord, OutboxOp};
use super::{
    Accepted, CancelOutcome, DeliveryMode, DueCursor, DueRequest, FlushReason, Lease, LedgerGroup,
    LedgerSum, NewRequest, Pending, QueuedDeadline, RequestRecord, Resolution, StoreError,
    WindowKey, WindowLimits, WindowOutcome, WindowRecord, WindowSlot, WindowState, WindowSummary,
};
use crate::model::{RequestId, RequestStatus, Scope, ServedBy, WindowId};

/// Rows fetched per page when streaming a window's lines.
pub(crate) const LINES_PAGE: i64 = 256;

/// Limits for a requeued request whose window is gone: the smaller of both
/// dialects' provider limits.
const FALLBACK_LIMITS: WindowLimits = WindowLimits {
    max_requests: 50_000,
    max_bytes: 200_000_000,
};

/// Results per multi-row resolve statement: 7 binds each, well inside both
/// backends' bind limits.
pub(crate) const RESOLVE_ROWS: usize = 500;

/// How a backend spells its bind placeholders in SQL built at run time.
pub(crate) trait Dialect {
    /// Appends the placeholder of the `n`th bind (from 1), binds in order.
    fn param(sql: &mut String, n: usize);
}

impl Dialect for sqlx::Sqlite {
    // Anonymous: SQLite finds a named `$N` by a linear walk of the
    // statement's names, quadratic over a statement of thousands of binds.
    fn param(sql: &mut String, _n: usize) {
        sql.push('?');
    }
}

impl Dialect for sqlx::Postgres {
    fn param(sql: &mut String, n: usize) {
        use std::fmt::Write as _;
        let _ = write!(sql, "${n}");
    }
}

/// A write: one state transition.
#[derive(Debug)]
pub(crate) enum Op {
    Accept(Box<NewRequest>),
    Cancel {
        id: RequestId,
        credential_hash: String,
        now: i64,
    },
    Seal {
        id: WindowId,
        reason: FlushReason,
        now: i64,
    },
    RecordUpload {
        id: WindowId,
        file_id: String,
    },
    MarkCreating {
        id: WindowId,
    },
    ClaimLease {
        on: Lease,
        owner: String,
        now: i64,
        until: i64,
    },
    ReleaseLease {
        on: Lease,
        owner: String,
    },
    ReleaseLeasesOf {
        owner: String,
    },
    RecordJob {
        id: WindowId,
        job_id: String,
        now: i64,
    },
    RecordJobStatus {
        id: WindowId,
        status: String,
    },
    ReturnToSealed {
        id: WindowId,
    },
    Finish {
        id: WindowId,
        outcome: WindowOutcome,
        now: i64,
    },
    Resolve {
        window: WindowId,
        resolutions: Vec<Resolution>,
    },
    ResolveOne(Box<Resolution>),
    FailUnresolved {
        window: WindowId,
        code: String,
        message: String,
        now: i64,
    },
    Requeue {
        ids: Vec<RequestId>,
        now: i64,
        /// Whether each move counts against `resubmit_limit`.
        counted: bool,
    },
    Purge {
        older_than: i64,
    },
    // ---- failure policies: resubmission, openness, pending counts ----
    Resubmit {
        window: WindowId,
        limit: u32,
        now: i64,
    },
    /// The webhook outbox's own transitions (`outbox.rs`).
    Outbox(OutboxOp),
}

/// What a write answers.
#[derive(Debug)]
pub(crate) enum Reply {
    Accepted(Box<Accepted>),
    Cancel(Box<CancelOutcome>),
    Applied(bool),
    Ids(Vec<RequestId>),
    Count(u64),
    Deliveries(Vec<DeliveryRecord>),
}

impl Reply {
    fn mismatch(self, op: &'static str) -> StoreError {
        StoreError::ReplyMismatch { op }
    }
    pub(crate) fn accepted(self) -> Result<Accepted, StoreError> {
        match self {
            Reply::Accepted(a) => Ok(*a),
            other => Err(other.mismatch("accept")),
        }
    }
    pub(crate) fn cancel(self) -> Result<CancelOutcome, StoreError> {
        match self {
            Reply::Cancel(c) => Ok(*c),
            other => Err(other.mismatch("cancel")),
        }
    }
    pub(crate) fn applied(self) -> Result<bool, StoreError> {
        match self {
            Reply::Applied(b) => Ok(b),
            other => Err(other.mismatch("transition")),
        }
    }
    pub(crate) fn ids(self) -> Result<Vec<RequestId>, StoreError> {
        match self {
            Reply::Ids(ids) => Ok(ids),
            other => Err(other.mismatch("resolution")),
        }
    }
    pub(crate) fn count(self) -> Result<u64, StoreError> {
        match self {
            Reply::Count(n) => Ok(n),
            other => Err(other.mismatch("purge")),
        }
    }
    pub(crate) fn deliveries(self) -> Result<Vec<DeliveryRecord>, StoreError> {
        match self {
            Reply::Deliveries(d) => Ok(d),
            other => Err(other.mismatch("claim")),
        }
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parsed<T>(
    column: &'static str,
    value: String,
    parse: fn(&str) -> Option<T>,
) -> Result<T, StoreError> {
    parse(&value).ok_or(StoreError::Corrupt { column, value })
}

fn parsed_opt<T>(
    column: &'static str,
    value: Option<String>,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>, StoreError> {
    value.map(|v| parsed(column, v, parse)).transpose()
}

/// Why a window holding `count` requests and `bytes` bytes cannot take one
/// more of `len` bytes, if it cannot. An empty window takes anything.
pub(crate) fn refuses(
    count: i64,
    bytes: i64,
    len: i64,
    limits: WindowLimits,
) -> Option<FlushReason> {
    if count == 0 {
        None
    } else if count + 1 > int(limits.max_requests) {
        Some(FlushReason::MaxRequests)
    } else if bytes + len > int(limits.max_bytes) {
        Some(FlushReason::MaxBytes)
    } else {
        None
    }
}

/// Limits never below one request and one byte.
pub(crate) fn sane(limits: WindowLimits) -> WindowLimits {
    WindowLimits {
        max_requests: limits.max_requests.max(1),
        max_bytes: limits.max_bytes.max(1),
    }
}

pub(crate) const INSERT_REQUEST: &str = "INSERT INTO requests (id, credential_hash, upstream, endpoint, \
    model, body, body_hash, idempotency_key, mode, deadline, callback_url, status, window_id, created_at, \
    retry_tag, scope, forward_headers) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'queued', $12, $13, $14, $15, $16)";

/// One savings ledger row, its request's upstream, model and credential
/// taken from the request itself; `$1` the request id. A request already
/// in the ledger keeps its row. (Binds appear in order: the SQLite writer
/// binds them by position.)
pub(crate) const LEDGER_INSERT: &str = "INSERT INTO ledger (request_id, completed_at, upstream, \
    model, credential_hash, served_by, input_tokens, output_tokens, realtime_nusd, served_nusd) \
    SELECT $1, $2, upstream, model, credential_hash, $3, $4, $5, $6, $7 FROM requests WHERE id = $1 \
    ON CONFLICT (request_id) DO NOTHING";

/// The second charge of a request paid twice: its batch line came back
/// after the request was answered another way (a deadline fallback while
/// the line was in a live batch). Recorded once: a re-download of the same
/// file finds the row already served by that tier, or the charge already
/// set. `$1` the charge, `$2` the request id, `$3` the tier of the line
/// (in order of appearance: the SQLite writer binds them by position).
pub(crate) const LEDGER_DOUBLE_PAID: &str = "UPDATE ledger SET double_paid_nusd = $1 \
    WHERE request_id = $2 AND double_paid_nusd = 0 AND served_by <> $3";

/// A token count as SQL stores it (saturating: no count is that large).
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A request's end-to-end headers as stored: a JSON array of `[name,
/// value]` pairs, NULL for none.
pub(crate) fn headers_to_stored(headers: &[(String, String)]) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    serde_json::to_string(headers).ok()
}

/// [`headers_to_stored`]'s form read back.
pub(crate) fn headers_from_stored(
    value: Option<String>,
) -> Result<Vec<(String, String)>, StoreError> {
    match value {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(&v).map_err(|_| StoreError::Corrupt {
            column: "forward_headers",
            value: v,
        }),
    }
}

/// A stored scope read back.
pub(crate) fn scope_from_stored(value: String) -> Result<Scope, StoreError> {
    parsed("scope", value, Scope::from_stored)
}

/// What an SDK retry is looked up by: 63 bits of FNV-1a over credential,
/// endpoint and body hash. An 8-byte key keeps the index cheap to maintain
/// (a composite of two 64-character hashes cost intake about a third of its
/// rate); the full columns are still compared. Stored, so it must never
/// change.
pub(crate) fn retry_tag(r: &NewRequest) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&r.credential_hash, &r.endpoint, &r.body_hash] {
        for b in part.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    i64::try_from(h >> 1).unwrap_or(0)
}

pub(crate) fn reattach(record: RequestRecord) -> Accepted {
    Accepted {
        record,
        created: false,
        window: None,
        sealed_previous: None,
    }
}

/// The record of a request just accepted into `window`.
pub(crate) fn queued_record(r: &NewRequest, window: &WindowId) -> RequestRecord {
    RequestRecord {
        id: r.id.clone(),
        status: RequestStatus::Queued,
        upstream: r.upstream.clone(),
        endpoint: r.endpoint.clone(),
        model: r.model.clone(),
        mode: r.mode,
        created_at: r.now,
        submitted_at: None,
        completed_at: None,
        batch_id: None,
        served_by: None,
        response_status: None,
        response_body: None,
        error_code: None,
        error_message: None,
        deadline: r.deadline,
        callback_url: r.callback_url.clone(),
        window_id: Some(window.clone()),
    }
}

/// The seal a window gets when the request just added filled it.
pub(crate) fn filled(count: i64, bytes: i64, limits: WindowLimits) -> Option<FlushReason> {
    if count >= int(limits.max_requests) {
        Some(FlushReason::MaxRequests)
    } else if bytes >= int(limits.max_bytes) {
        Some(FlushReason::MaxBytes)
    } else {
        None
    }
}

macro_rules! req_cols {
    () => {
        "id, status, upstream, endpoint, model, mode, created_at, submitted_at, completed_at, \
         batch_id, served_by, response_status, response_body, error_code, error_message, \
         deadline, callback_url, window_id"
    };
}

macro_rules! window_cols {
    () => {
        "id, upstream, credential_hash, endpoint, model, state, count, bytes, max_requests, \
         max_bytes, opened_at, sealed_at, flush_reason, upstream_key, file_id, job_id, \
         provider_status, submitted_at, finished_at, scope"
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: WindowLimits = WindowLimits {
        max_requests: 3,
        max_bytes: 100,
    };

    #[test]
    fn retry_tag_is_stable_and_positive() {
        let r = NewRequest {
            id: RequestId::generate(),
            credential_hash: "c".into(),
            upstream: "u".into(),
            endpoint: "/v1/chat/completions".into(),
            model: "m".into(),
            scope: Scope::default(),
            forward_headers: Vec::new(),
            body: Bytes::new(),
            body_hash: "h".into(),
            idempotency_key: None,
            sdk_retry: false,
            mode: DeliveryMode::Wait,
            deadline: None,
            callback_url: None,
            upstream_key: None,
            limits: L,
            now: 0,
        };
        // A stored value: this number must never change (checked against an
        // independent FNV-1a).
        assert_eq!(retry_tag(&r), 7_803_707_488_622_487_217);
        let mut other = r.clone();
        other.credential_hash = "c2".into();
        assert_ne!(retry_tag(&other), retry_tag(&r));
        assert!(retry_tag(&other) >= 0);
    }

    #[test]
    fn an_empty_window_takes_any_request() {
        assert_eq!(refuses(0, 0, 1_000, L), None);
    }

    #[test]
    fn a_window_refuses_the_request_past_either_limit() {
        assert_eq!(refuses(2, 10, 10, L), None);
        assert_eq!(refuses(3, 10, 10, L), Some(FlushReason::MaxRequests));
        assert_eq!(refuses(1, 95, 5, L), None);
        assert_eq!(refuses(1, 95, 6, L), Some(FlushReason::MaxBytes));
    }

    #[test]
    fn a_window_reaching_a_limit_exactly_is_full() {
        assert_eq!(filled(3, 10, L), Some(FlushReason::MaxRequests));
        assert_eq!(filled(2, 100, L), Some(FlushReason::MaxBytes));
        assert_eq!(filled(2, 99, L), None);
    }
}

pub(crate) mod sqlite_ops {
    super::super::reads::read_ops!(sqlx::Sqlite);
    super::super::writes::write_ops!(sqlx::Sqlite);
    super::super::outbox::outbox_ops!(sqlx::Sqlite);
}

pub(crate) mod pg_ops {
    super::super::reads::read_ops!(sqlx::Postgres);
    super::super::writes::write_ops!(sqlx::Postgres);
    super::super::outbox::outbox_ops!(sqlx::Postgres);
}

/// Applies each migration newer than the stored version, in order, in one
/// transaction; `lock` runs first (Postgres: an advisory lock, so replicas
/// starting together migrate once).
macro_rules! migrate_fn {
    ($db:ty) => {
        pub(crate) async fn migrate(
            conn: &mut <$db as sqlx::Database>::Connection,
            lock: &str,
            migrations: &[&str],
        ) -> Result<(), StoreError> {
            use sqlx::{Connection as _, Row as _};
            let mut tx = conn.begin().await?;
            if !lock.is_empty() {
                sqlx::query::<$db>(lock).execute(&mut *tx).await?;
            }
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS carpool_schema (version BIGINT NOT NULL)")
                .execute(&mut *tx)
                .await?;
            let current: i64 = sqlx::query::<$db>(
                "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) AS v FROM carpool_schema",
            )
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
            for (i, script) in migrations.iter().enumerate() {
                let version = i as i64 + 1;
                if version > current {
                    sqlx::raw_sql(script).execute(&mut *tx).await?;
                    sqlx::query::<$db>("INSERT INTO carpool_schema (version) VALUES ($1)")
                        .bind(version)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(())
        }
    };
}

pub(crate) mod sqlite_migrate {
    use super::StoreError;
    migrate_fn!(sqlx::Sqlite);
}

pub(crate) mod pg_migrate {
    use super::StoreError;
    migrate_fn!(sqlx::Postgres);
}
