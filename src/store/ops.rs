//! The SQL of every transition and read, written once and compiled for each
//! backend by [`backend_ops!`]: the statements use `$N` placeholders and
//! types both SQLite and Postgres accept. A transition runs inside the
//! transaction its caller opened (the SQLite writer's group, or a Postgres
//! transaction) and checks its allowed-from states in its `WHERE`.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::model::{request_from_sql, window_from_sql};
use super::{
    Accepted, CancelOutcome, DeliveryMode, FlushReason, NewRequest, RequestRecord, Resolution,
    StoreError, WindowKey, WindowLimits, WindowOutcome, WindowRecord, WindowSlot, WindowState,
    WindowSummary,
};
use crate::model::{RequestId, RequestStatus, ServedBy, WindowId};

/// Rows fetched per page when streaming a window's lines.
pub(crate) const LINES_PAGE: i64 = 256;

/// Limits for a requeued request whose window is gone: the smaller of both
/// dialects' provider limits.
const FALLBACK_LIMITS: WindowLimits = WindowLimits {
    max_requests: 50_000,
    max_bytes: 200_000_000,
};

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
    RecordJob {
        id: WindowId,
        job_id: String,
        now: i64,
    },
    RecordJobStatus {
        id: WindowId,
        status: String,
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
    },
    Purge {
        older_than: i64,
    },
}

/// What a write answers.
#[derive(Debug)]
pub(crate) enum Reply {
    Accepted(Box<Accepted>),
    Cancel(Box<CancelOutcome>),
    Applied(bool),
    Ids(Vec<RequestId>),
    Count(u64),
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
    retry_tag) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'queued', $12, $13, $14)";

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
         provider_status, submitted_at, finished_at"
    };
}

macro_rules! backend_ops {
    ($db:ty) => {
        use sqlx::Row as _;

        use super::*;

        pub(crate) type Conn = <$db as sqlx::Database>::Connection;
        type DbRow = <$db as sqlx::Database>::Row;

        fn q(sql: &str) -> sqlx::query::Query<'_, $db, <$db as sqlx::Database>::Arguments<'_>> {
            sqlx::query::<$db>(sql)
        }

        pub(crate) fn record(row: &DbRow) -> Result<RequestRecord, StoreError> {
            let response_status = row
                .try_get::<Option<i64>, _>("response_status")?
                .map(|v| {
                    u16::try_from(v).map_err(|_| StoreError::Corrupt {
                        column: "response_status",
                        value: v.to_string(),
                    })
                })
                .transpose()?;
            Ok(RequestRecord {
                id: RequestId::from_stored(row.try_get("id")?),
                status: parsed("status", row.try_get("status")?, RequestStatus::parse)?,
                upstream: row.try_get("upstream")?,
                endpoint: row.try_get("endpoint")?,
                model: row.try_get("model")?,
                mode: parsed("mode", row.try_get("mode")?, DeliveryMode::parse)?,
                created_at: row.try_get("created_at")?,
                submitted_at: row.try_get("submitted_at")?,
                completed_at: row.try_get("completed_at")?,
                batch_id: row.try_get("batch_id")?,
                served_by: parsed_opt("served_by", row.try_get("served_by")?, ServedBy::parse)?,
                response_status,
                response_body: row
                    .try_get::<Option<Vec<u8>>, _>("response_body")?
                    .map(Bytes::from),
                error_code: row.try_get("error_code")?,
                error_message: row.try_get("error_message")?,
                deadline: row.try_get("deadline")?,
                callback_url: row.try_get("callback_url")?,
                window_id: row
                    .try_get::<Option<String>, _>("window_id")?
                    .map(WindowId::from_stored),
            })
        }

        fn window_key(row: &DbRow) -> Result<WindowKey, StoreError> {
            Ok(WindowKey {
                upstream: row.try_get("upstream")?,
                credential_hash: row.try_get("credential_hash")?,
                endpoint: row.try_get("endpoint")?,
                model: row.try_get("model")?,
            })
        }

        fn window_record(row: &DbRow) -> Result<WindowRecord, StoreError> {
            Ok(WindowRecord {
                id: WindowId::from_stored(row.try_get("id")?),
                key: window_key(row)?,
                state: parsed("state", row.try_get("state")?, WindowState::parse)?,
                count: uint(row.try_get("count")?),
                bytes: uint(row.try_get("bytes")?),
                limits: WindowLimits {
                    max_requests: uint(row.try_get("max_requests")?),
                    max_bytes: uint(row.try_get("max_bytes")?),
                },
                opened_at: row.try_get("opened_at")?,
                sealed_at: row.try_get("sealed_at")?,
                flush_reason: parsed_opt(
                    "flush_reason",
                    row.try_get("flush_reason")?,
                    FlushReason::parse,
                )?,
                upstream_key: row.try_get("upstream_key")?,
                file_id: row.try_get("file_id")?,
                job_id: row.try_get("job_id")?,
                provider_status: row.try_get("provider_status")?,
                submitted_at: row.try_get("submitted_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        }

        /// Runs one write in the caller's transaction.
        pub(crate) async fn apply(conn: &mut Conn, op: &Op, horizon: i64) -> Result<Reply, StoreError> {
            Ok(match op {
                Op::Accept(req) => Reply::Accepted(Box::new(accept(conn, req, horizon).await?)),
                Op::Cancel { id, credential_hash, now } => {
                    Reply::Cancel(Box::new(cancel(conn, id, credential_hash, *now).await?))
                }
                Op::Seal { id, reason, now } => Reply::Applied(seal(conn, id, *reason, *now).await?),
                Op::RecordUpload { id, file_id } => Reply::Applied(
                    q(&format!(
                        "UPDATE windows SET state = 'uploaded', file_id = $2 \
                         WHERE id = $1 AND state IN ({})",
                        window_from_sql(WindowState::Uploaded)
                    ))
                    .bind(id.as_str())
                    .bind(file_id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        == 1,
                ),
                Op::MarkCreating { id } => Reply::Applied(
                    q(&format!(
                        "UPDATE windows SET state = 'creating' WHERE id = $1 AND state IN ({})",
                        window_from_sql(WindowState::Creating)
                    ))
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        == 1,
                ),
                Op::RecordJob { id, job_id, now } => {
                    Reply::Applied(record_job(conn, id, job_id, *now).await?)
                }
                Op::RecordJobStatus { id, status } => Reply::Applied(
                    q("UPDATE windows SET provider_status = $2 WHERE id = $1 AND state = 'submitted'")
                        .bind(id.as_str())
                        .bind(status)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                        == 1,
                ),
                Op::Finish { id, outcome, now } => {
                    let to = outcome.state();
                    Reply::Applied(
                        q(&format!(
                            "UPDATE windows SET state = $2, finished_at = $3, upstream_key = NULL \
                             WHERE id = $1 AND state IN ({})",
                            window_from_sql(to)
                        ))
                        .bind(id.as_str())
                        .bind(to.as_str())
                        .bind(*now)
                        .execute(&mut *conn)
                        .await?
                        .rows_affected()
                            == 1,
                    )
                }
                Op::Resolve { window, resolutions } => {
                    let mut changed = Vec::new();
                    for r in resolutions {
                        if resolve_one(conn, r, Some(window)).await? {
                            changed.push(r.id.clone());
                        }
                    }
                    Reply::Ids(changed)
                }
                Op::ResolveOne(r) => Reply::Applied(resolve_one(conn, r, None).await?),
                Op::FailUnresolved { window, code, message, now } => {
                    let rows = q(&format!(
                        "UPDATE requests SET status = 'failed', error_code = $2, error_message = $3, \
                         completed_at = $4 WHERE window_id = $1 AND status IN ({}) RETURNING id",
                        request_from_sql(RequestStatus::Failed)
                    ))
                    .bind(window.as_str())
                    .bind(code)
                    .bind(message)
                    .bind(*now)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    for row in &rows {
                        ids.push(RequestId::from_stored(row.try_get("id")?));
                    }
                    Reply::Ids(ids)
                }
                Op::Requeue { ids, now } => Reply::Ids(requeue(conn, ids, *now).await?),
                Op::Purge { older_than } => {
                    let final_states = super::super::model::sql_list(
                        RequestStatus::ALL.into_iter().filter(|s| s.is_final()).map(|s| s.as_str()),
                    );
                    let n = q(&format!(
                        "DELETE FROM requests WHERE completed_at < $1 AND status IN ({final_states})"
                    ))
                    .bind(*older_than)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    q("DELETE FROM windows WHERE finished_at < $1 AND state IN ('completed', 'failed')")
                        .bind(*older_than)
                        .execute(&mut *conn)
                        .await?;
                    Reply::Count(n)
                }
            })
        }


        /// An earlier request this one repeats: same idempotency key (same
        /// body, else a conflict), or an SDK retry of a live request.
        pub(crate) async fn existing(conn: &mut Conn, r: &NewRequest, horizon: i64) -> Result<Option<Accepted>, StoreError> {
            if let Some(key) = &r.idempotency_key {
                let sql = concat!(
                    "SELECT ", req_cols!(), ", body_hash FROM requests \
                     WHERE credential_hash = $1 AND idempotency_key = $2"
                );
                let found = q(sql).bind(&r.credential_hash).bind(key).fetch_optional(&mut *conn).await?;
                if let Some(row) = found {
                    let hash: String = row.try_get("body_hash")?;
                    if hash != r.body_hash {
                        return Err(StoreError::IdempotencyConflict);
                    }
                    return Ok(Some(reattach(record(&row)?)));
                }
            }
            if r.sdk_retry {
                let sql = concat!(
                    "SELECT ", req_cols!(), " FROM requests \
                     WHERE retry_tag = $5 AND credential_hash = $1 AND body_hash = $2 AND endpoint = $3 \
                     AND status <> 'cancelled' AND created_at >= $4 ORDER BY seq DESC LIMIT 1"
                );
                let found = q(sql)
                    .bind(&r.credential_hash)
                    .bind(&r.body_hash)
                    .bind(&r.endpoint)
                    .bind(r.now.saturating_sub(horizon))
                    .bind(retry_tag(r))
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = found {
                    return Ok(Some(reattach(record(&row)?)));
                }
            }
            Ok(None)
        }

        async fn accept(conn: &mut Conn, r: &NewRequest, horizon: i64) -> Result<Accepted, StoreError> {
            if let Some(found) = existing(conn, r, horizon).await? {
                return Ok(found);
            }
            let key = WindowKey {
                upstream: r.upstream.clone(),
                credential_hash: r.credential_hash.clone(),
                endpoint: r.endpoint.clone(),
                model: r.model.clone(),
            };
            let len = int(r.body.len() as u64);
            let (slot, sealed_previous) =
                place(conn, &key, len, r.limits, r.upstream_key.as_deref(), r.now).await?;
            q(INSERT_REQUEST)
                .bind(r.id.as_str())
                .bind(&r.credential_hash)
                .bind(&r.upstream)
                .bind(&r.endpoint)
                .bind(&r.model)
                .bind(r.body.as_ref())
                .bind(&r.body_hash)
                .bind(r.idempotency_key.as_deref())
                .bind(r.mode.as_str())
                .bind(r.deadline)
                .bind(r.callback_url.as_deref())
                .bind(slot.id.as_str())
                .bind(r.now)
                .bind(retry_tag(r))
                .execute(&mut *conn)
                .await?;
            let record = queued_record(r, &slot.id);
            Ok(Accepted { record, created: true, window: Some(slot), sealed_previous })
        }

        /// Adds `len` bytes to the open window of `key`, sealing it first if
        /// they would not fit and opening a new one; seals the window the
        /// request lands in when it is then full.
        async fn place(
            conn: &mut Conn,
            key: &WindowKey,
            len: i64,
            limits: WindowLimits,
            upstream_key: Option<&str>,
            now: i64,
        ) -> Result<(WindowSlot, Option<(WindowId, FlushReason)>), StoreError> {
            let limits = sane(limits);
            let mut previous = None;
            // Postgres, read committed: a window another replica opened may
            // become visible between statements; never seal a window that
            // can still take the request, go back and join it instead.
            let mut rounds = 0;
            let joined = loop {
                rounds += 1;
                let row = q("UPDATE windows SET count = count + 1, bytes = bytes + $5, \
                             upstream_key = COALESCE(upstream_key, $8) \
                             WHERE upstream = $1 AND credential_hash = $2 AND endpoint = $3 AND model = $4 \
                             AND state = 'open' AND count + 1 <= $6 AND (count = 0 OR bytes + $5 <= $7) \
                             RETURNING id, count, bytes, opened_at")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .bind(len)
                    .bind(int(limits.max_requests))
                    .bind(int(limits.max_bytes))
                    .bind(upstream_key)
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = row {
                    break Some(row);
                }
                let sealed = q("UPDATE windows SET state = 'sealed', sealed_at = $5, \
                                flush_reason = CASE WHEN count + 1 > $6 THEN 'max_requests' ELSE 'max_bytes' END \
                                WHERE upstream = $1 AND credential_hash = $2 AND endpoint = $3 AND model = $4 \
                                AND state = 'open' AND (count + 1 > $6 OR (count > 0 AND bytes + $8 > $7)) \
                                RETURNING id, flush_reason")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .bind(now)
                    .bind(int(limits.max_requests))
                    .bind(int(limits.max_bytes))
                    .bind(len)
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = sealed {
                    previous = Some((
                        WindowId::from_stored(row.try_get("id")?),
                        parsed("flush_reason", row.try_get("flush_reason")?, FlushReason::parse)?,
                    ));
                    break None;
                }
                let open = q("SELECT id FROM windows WHERE upstream = $1 AND credential_hash = $2 \
                              AND endpoint = $3 AND model = $4 AND state = 'open'")
                    .bind(&key.upstream)
                    .bind(&key.credential_hash)
                    .bind(&key.endpoint)
                    .bind(&key.model)
                    .fetch_optional(&mut *conn)
                    .await?;
                if open.is_none() || rounds >= 3 {
                    break None;
                }
            };
            let (id, count, bytes, opened_at) = match joined {
                Some(row) => (
                    WindowId::from_stored(row.try_get("id")?),
                    row.try_get::<i64, _>("count")?,
                    row.try_get::<i64, _>("bytes")?,
                    row.try_get::<i64, _>("opened_at")?,
                ),
                None => {
                    let id = WindowId::generate();
                    // A racing insert of the key's open window fails on the
                    // unique index and the whole transaction is retried.
                    q("INSERT INTO windows (id, upstream, credential_hash, endpoint, model, state, count, \
                       bytes, max_requests, max_bytes, opened_at, upstream_key) \
                       VALUES ($1, $2, $3, $4, $5, 'open', 1, $6, $7, $8, $9, $10)")
                        .bind(id.as_str())
                        .bind(&key.upstream)
                        .bind(&key.credential_hash)
                        .bind(&key.endpoint)
                        .bind(&key.model)
                        .bind(len)
                        .bind(int(limits.max_requests))
                        .bind(int(limits.max_bytes))
                        .bind(now)
                        .bind(upstream_key)
                        .execute(&mut *conn)
                        .await?;
                    (id, 1, len, now)
                }
            };
            let sealed = filled(count, bytes, limits);
            if let Some(reason) = sealed {
                seal(conn, &id, reason, now).await?;
            }
            let slot = WindowSlot { id, count: uint(count), bytes: uint(bytes), opened_at, sealed };
            Ok((slot, previous))
        }

        async fn seal(conn: &mut Conn, id: &WindowId, reason: FlushReason, now: i64) -> Result<bool, StoreError> {
            Ok(q(&format!(
                "UPDATE windows SET state = 'sealed', sealed_at = $2, flush_reason = $3 \
                 WHERE id = $1 AND state IN ({})",
                window_from_sql(WindowState::Sealed)
            ))
            .bind(id.as_str())
            .bind(now)
            .bind(reason.as_str())
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1)
        }

        async fn cancel(conn: &mut Conn, id: &RequestId, credential_hash: &str, now: i64) -> Result<CancelOutcome, StoreError> {
            let Some(row) = q("SELECT status, window_id, CAST(length(body) AS BIGINT) AS len FROM requests \
                               WHERE id = $1 AND credential_hash = $2")
                .bind(id.as_str())
                .bind(credential_hash)
                .fetch_optional(&mut *conn)
                .await?
            else {
                return Ok(CancelOutcome::NotFound);
            };
            let status = parsed("status", row.try_get("status")?, RequestStatus::parse)?;
            let window: Option<String> = row.try_get("window_id")?;
            let len: i64 = row.try_get("len")?;
            let changed = !status.is_final()
                && q(&format!(
                    "UPDATE requests SET status = 'cancelled', completed_at = $2 \
                     WHERE id = $1 AND status IN ({})",
                    request_from_sql(RequestStatus::Cancelled)
                ))
                .bind(id.as_str())
                .bind(now)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    == 1;
            if changed && status == RequestStatus::Queued {
                if let Some(window) = window {
                    // Still counted towards a window not yet uploaded: leave
                    // it, and drop a window left empty so the next request
                    // opens a fresh one (its age restarts).
                    q("UPDATE windows SET count = count - 1, bytes = bytes - $2 \
                       WHERE id = $1 AND state IN ('open', 'sealed')")
                        .bind(&window)
                        .bind(len)
                        .execute(&mut *conn)
                        .await?;
                    q("DELETE FROM windows WHERE id = $1 AND state = 'open' AND count <= 0")
                        .bind(&window)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            let record = get(conn, id, credential_hash).await?;
            Ok(match record {
                Some(r) if changed => CancelOutcome::Cancelled(r),
                Some(r) => CancelOutcome::AlreadyFinal(r),
                None => CancelOutcome::NotFound,
            })
        }

        async fn record_job(conn: &mut Conn, id: &WindowId, job_id: &str, now: i64) -> Result<bool, StoreError> {
            let moved = q(&format!(
                "UPDATE windows SET state = 'submitted', job_id = $2, submitted_at = $3, \
                 upstream_key = NULL WHERE id = $1 AND state IN ({})",
                window_from_sql(WindowState::Submitted)
            ))
            .bind(id.as_str())
            .bind(job_id)
            .bind(now)
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1;
            if moved {
                q(&format!(
                    "UPDATE requests SET status = 'submitted', batch_id = $2, submitted_at = $3 \
                     WHERE window_id = $1 AND status IN ({})",
                    request_from_sql(RequestStatus::Submitted)
                ))
                .bind(id.as_str())
                .bind(job_id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Ok(moved)
        }

        async fn resolve_one(conn: &mut Conn, r: &Resolution, window: Option<&WindowId>) -> Result<bool, StoreError> {
            let to = r.status.status();
            Ok(q(&format!(
                "UPDATE requests SET status = $3, served_by = $4, response_status = $5, \
                 response_body = $6, error_code = $7, error_message = $8, completed_at = $9 \
                 WHERE id = $1 AND ($2 IS NULL OR window_id = $2) AND status IN ({})",
                request_from_sql(to)
            ))
            .bind(r.id.as_str())
            .bind(window.map(|w| w.as_str()))
            .bind(to.as_str())
            .bind(r.served_by.map(|s| s.as_str()))
            .bind(r.response_status.map(i64::from))
            .bind(r.response_body.as_deref())
            .bind(r.error_code.as_deref())
            .bind(r.error_message.as_deref())
            .bind(r.completed_at)
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1)
        }

        async fn requeue(conn: &mut Conn, ids: &[RequestId], now: i64) -> Result<Vec<RequestId>, StoreError> {
            let mut moved = Vec::new();
            for id in ids {
                let row = q(&format!(
                    "UPDATE requests SET status = 'queued', batch_id = NULL, submitted_at = NULL \
                     WHERE id = $1 AND status IN ({}) \
                     RETURNING upstream, credential_hash, endpoint, model, window_id, \
                     CAST(length(body) AS BIGINT) AS len",
                    request_from_sql(RequestStatus::Queued)
                ))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = row else { continue };
                let key = window_key(&row)?;
                let old: Option<String> = row.try_get("window_id")?;
                let limits = match &old {
                    Some(old) => q("SELECT max_requests, max_bytes FROM windows WHERE id = $1")
                        .bind(old)
                        .fetch_optional(&mut *conn)
                        .await?
                        .map(|w| -> Result<WindowLimits, StoreError> {
                            Ok(WindowLimits {
                                max_requests: uint(w.try_get("max_requests")?),
                                max_bytes: uint(w.try_get("max_bytes")?),
                            })
                        })
                        .transpose()?
                        .unwrap_or(FALLBACK_LIMITS),
                    None => FALLBACK_LIMITS,
                };
                let (slot, _) = place(conn, &key, row.try_get("len")?, limits, None, now).await?;
                q("UPDATE requests SET window_id = $2 WHERE id = $1")
                    .bind(id.as_str())
                    .bind(slot.id.as_str())
                    .execute(&mut *conn)
                    .await?;
                moved.push(id.clone());
            }
            Ok(moved)
        }

        // ---- reads (any connection; no transaction needed) ----------------

        pub(crate) async fn get(conn: &mut Conn, id: &RequestId, credential_hash: &str) -> Result<Option<RequestRecord>, StoreError> {
            let sql = concat!("SELECT ", req_cols!(), " FROM requests WHERE id = $1 AND credential_hash = $2");
            q(sql)
                .bind(id.as_str())
                .bind(credential_hash)
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| record(&row))
                .transpose()
        }

        pub(crate) async fn list(
            conn: &mut Conn,
            credential_hash: &str,
            status: Option<RequestStatus>,
            limit: u32,
            after: Option<&RequestId>,
        ) -> Result<Vec<RequestRecord>, StoreError> {
            let sql = concat!(
                "SELECT ", req_cols!(), " FROM requests WHERE credential_hash = $1 \
                 AND ($2 IS NULL OR status = $2) \
                 AND ($3 IS NULL OR seq < (SELECT seq FROM requests WHERE id = $3 AND credential_hash = $1)) \
                 ORDER BY seq DESC LIMIT $4"
            );
            q(sql)
                .bind(credential_hash)
                .bind(status.map(|s| s.as_str()))
                .bind(after.map(|a| a.as_str()))
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(record)
                .collect()
        }

        pub(crate) async fn request_body(conn: &mut Conn, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
            Ok(q("SELECT body FROM requests WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| row.try_get::<Vec<u8>, _>("body"))
                .transpose()?
                .map(Bytes::from))
        }

        pub(crate) async fn due_requests(conn: &mut Conn, before: i64, limit: u32) -> Result<Vec<RequestRecord>, StoreError> {
            let sql = concat!(
                "SELECT ", req_cols!(), " FROM requests WHERE deadline IS NOT NULL AND deadline <= $1 \
                 AND status IN ('queued', 'submitted') ORDER BY deadline LIMIT $2"
            );
            q(sql)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(record)
                .collect()
        }

        pub(crate) async fn open_request_ids(conn: &mut Conn, window: &WindowId) -> Result<Vec<RequestId>, StoreError> {
            let rows = q("SELECT id FROM requests WHERE window_id = $1 \
                          AND status IN ('queued', 'submitted') ORDER BY seq")
                .bind(window.as_str())
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| Ok(RequestId::from_stored(row.try_get("id")?)))
                .collect()
        }

        pub(crate) async fn open_windows(conn: &mut Conn) -> Result<Vec<WindowSummary>, StoreError> {
            let rows = q("SELECT w.id, w.upstream, w.credential_hash, w.endpoint, w.model, w.count, \
                          w.bytes, w.opened_at, (SELECT MIN(r.deadline) FROM requests r \
                          WHERE r.window_id = w.id AND r.status = 'queued') AS earliest_deadline \
                          FROM windows w WHERE w.state = 'open' ORDER BY w.opened_at")
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(WindowSummary {
                        id: WindowId::from_stored(row.try_get("id")?),
                        key: window_key(row)?,
                        count: uint(row.try_get("count")?),
                        bytes: uint(row.try_get("bytes")?),
                        opened_at: row.try_get("opened_at")?,
                        earliest_deadline: row.try_get("earliest_deadline")?,
                    })
                })
                .collect()
        }

        pub(crate) async fn window(conn: &mut Conn, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
            q(concat!("SELECT ", window_cols!(), " FROM windows WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| window_record(&row))
                .transpose()
        }

        pub(crate) async fn windows_in(conn: &mut Conn, states: &[WindowState]) -> Result<Vec<WindowRecord>, StoreError> {
            if states.is_empty() {
                return Ok(Vec::new());
            }
            let list = super::super::model::sql_list(states.iter().map(|s| s.as_str()));
            q(&format!(
                concat!("SELECT ", window_cols!(), " FROM windows WHERE state IN ({}) ORDER BY opened_at, id"),
                list
            ))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(window_record)
            .collect()
        }

        async fn lines_page(conn: &mut Conn, window: &WindowId, after: i64) -> Result<Vec<(i64, RequestId, Bytes)>, StoreError> {
            let rows = q("SELECT seq, id, body FROM requests WHERE window_id = $1 \
                          AND status IN ('queued', 'submitted') AND seq > $2 ORDER BY seq LIMIT $3")
                .bind(window.as_str())
                .bind(after)
                .bind(LINES_PAGE)
                .fetch_all(&mut *conn)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok((
                        row.try_get("seq")?,
                        RequestId::from_stored(row.try_get("id")?),
                        Bytes::from(row.try_get::<Vec<u8>, _>("body")?),
                    ))
                })
                .collect()
        }

        /// Streams a window's lines page by page (keyset on `seq`), so at
        /// most one page is in memory and no read transaction stays open.
        pub(crate) fn window_lines(
            pool: sqlx::Pool<$db>,
            window: WindowId,
        ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
            struct Cursor {
                pool: sqlx::Pool<$db>,
                window: WindowId,
                after: i64,
                page: VecDeque<(RequestId, Bytes)>,
                done: bool,
            }
            let start = Cursor { pool, window, after: 0, page: VecDeque::new(), done: false };
            stream::unfold(start, |mut c| async move {
                loop {
                    if let Some(line) = c.page.pop_front() {
                        return Some((Ok(line), c));
                    }
                    if c.done {
                        return None;
                    }
                    let page = match c.pool.acquire().await {
                        Ok(mut conn) => lines_page(&mut conn, &c.window, c.after).await,
                        Err(e) => Err(e.into()),
                    };
                    match page {
                        Ok(rows) => {
                            c.done = (rows.len() as i64) < LINES_PAGE;
                            if let Some((seq, _, _)) = rows.last() {
                                c.after = *seq;
                            }
                            c.page.extend(rows.into_iter().map(|(_, id, body)| (id, body)));
                        }
                        Err(e) => {
                            c.done = true;
                            return Some((Err(e), c));
                        }
                    }
                }
            })
            .boxed()
        }
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
    backend_ops!(sqlx::Sqlite);
}

pub(crate) mod pg_ops {
    backend_ops!(sqlx::Postgres);
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
