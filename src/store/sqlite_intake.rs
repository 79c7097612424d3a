//! Batched intake for the SQLite writer: a run of accepts in one group
//! commit is placed into windows in memory (one read per window key), then
//! written with one prepared INSERT per request through SQLite's C API and
//! one write per window touched, instead of several statements per request. The semantics are
//! those of `ops::accept` applied in order: repeats and retries are matched
//! against the store and against earlier requests of the same run.

use std::collections::HashMap;

use sqlx::sqlite::SqliteConnection;
use sqlx::Row as _;

use super::ops::{
    filled, headers_to_stored, queued_record, reattach, refuses, retry_tag, sane, sqlite_ops,
};
use super::sqlite_direct::direct;
use super::{Accepted, FlushReason, NewRequest, StoreError, WindowKey, WindowSlot};
use crate::model::{Scope, WindowId};

/// A window as this run fills it.
struct Fill {
    id: WindowId,
    key: WindowKey,
    /// Already in the database (open) before this run.
    stored: bool,
    count: i64,
    bytes: i64,
    opened_at: i64,
    max_requests: i64,
    max_bytes: i64,
    upstream_key: Option<String>,
    sealed: Option<(FlushReason, i64)>,
}

pub(crate) async fn accept_run(
    conn: &mut SqliteConnection,
    run: &[&NewRequest],
    horizon: i64,
) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
    let mut out: Vec<Result<Accepted, StoreError>> = Vec::with_capacity(run.len());
    // Earlier requests of this run that later ones may repeat: index in `run`.
    let mut by_idempotency: HashMap<(&str, &str), usize> = HashMap::new();
    let mut by_retry: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut fills: Vec<Fill> = Vec::new();
    // Each key's open window in `fills`, by the run's own strings: a key
    // is copied into a `WindowKey` only when it is first seen in the run.
    let mut current: HashMap<(&str, &str, &str, &str, &Scope), Option<usize>> = HashMap::new();
    let mut inserts: Vec<(usize, usize)> = Vec::new(); // (request, fill)

    for (i, r) in run.iter().enumerate() {
        if let Some(repeat) = repeat_in_run(r, run, &out, &by_idempotency, &by_retry) {
            out.push(repeat);
            continue;
        }
        match sqlite_ops::existing(conn, r, horizon).await {
            Ok(Some(found)) => {
                out.push(Ok(found));
                continue;
            }
            Ok(None) => {}
            Err(e) if e.wrote_nothing() => {
                out.push(Err(e));
                continue;
            }
            Err(e) => return Err(e),
        }

        let key = (
            r.upstream.as_str(),
            r.credential_hash.as_str(),
            r.endpoint.as_str(),
            r.window_model(),
            &r.scope,
        );
        let slot_index = match current.get(&key) {
            Some(slot) => *slot,
            None => {
                let stored = load_open(conn, &r.window_key()).await?;
                let index = stored.map(|f| {
                    fills.push(f);
                    fills.len() - 1
                });
                current.insert(key, index);
                index
            }
        };
        let limits = sane(r.limits);
        let len = i64::try_from(r.body.len()).unwrap_or(i64::MAX);
        let mut sealed_previous = None;
        let mut target = slot_index;
        if let Some(f) = target.map(|t| &mut fills[t]) {
            if let Some(reason) = refuses(f.count, f.bytes, len, limits) {
                f.sealed = Some((reason, r.now));
                sealed_previous = Some((f.id.clone(), reason));
                target = None;
            }
        }
        let t = match target {
            Some(t) => t,
            None => {
                fills.push(Fill {
                    id: WindowId::generate(),
                    key: r.window_key(),
                    stored: false,
                    count: 0,
                    bytes: 0,
                    opened_at: r.now,
                    max_requests: i64::try_from(limits.max_requests).unwrap_or(i64::MAX),
                    max_bytes: i64::try_from(limits.max_bytes).unwrap_or(i64::MAX),
                    upstream_key: None,
                    sealed: None,
                });
                fills.len() - 1
            }
        };
        let f = &mut fills[t];
        f.count += 1;
        f.bytes += len;
        if f.upstream_key.is_none() {
            f.upstream_key.clone_from(&r.upstream_key);
        }
        let sealed = filled(f.count, f.bytes, limits);
        if let Some(reason) = sealed {
            f.sealed = Some((reason, r.now));
        }
        current.insert(key, if sealed.is_some() { None } else { Some(t) });
        let slot = WindowSlot {
            id: f.id.clone(),
            count: u64::try_from(f.count).unwrap_or(0),
            bytes: u64::try_from(f.bytes).unwrap_or(0),
            opened_at: f.opened_at,
            sealed,
        };
        if let Some(k) = &r.idempotency_key {
            by_idempotency.insert((&r.credential_hash, k), i);
        }
        by_retry.insert((&r.credential_hash, &r.endpoint, &r.body_hash), i);
        inserts.push((i, t));
        out.push(Ok(Accepted {
            record: queued_record(r, &slot.id),
            created: true,
            window: Some(slot),
            sealed_previous,
        }));
    }

    // Windows first, in the order they were opened, so that a key's old
    // window is sealed before its new one is inserted as open.
    for f in &fills {
        write_fill(conn, f).await?;
    }
    insert_requests(conn, run, &fills, &inserts).await?;
    Ok(out)
}

/// A repeat of an earlier request of this run, answered like the store
/// would answer it once that request is committed.
fn repeat_in_run(
    r: &NewRequest,
    run: &[&NewRequest],
    out: &[Result<Accepted, StoreError>],
    by_idempotency: &HashMap<(&str, &str), usize>,
    by_retry: &HashMap<(&str, &str, &str), usize>,
) -> Option<Result<Accepted, StoreError>> {
    let earlier = |i: usize| match &out[i] {
        Ok(a) => Some(a.record.clone()),
        Err(_) => None,
    };
    if let Some(k) = &r.idempotency_key {
        if let Some(&i) = by_idempotency.get(&(r.credential_hash.as_str(), k.as_str())) {
            if run[i].body_hash != r.body_hash {
                return Some(Err(StoreError::IdempotencyConflict));
            }
            return earlier(i).map(|rec| Ok(reattach(rec)));
        }
    }
    if r.sdk_retry {
        let key = (
            r.credential_hash.as_str(),
            r.endpoint.as_str(),
            r.body_hash.as_str(),
        );
        if let Some(&i) = by_retry.get(&key) {
            return earlier(i).map(|rec| Ok(reattach(rec)));
        }
    }
    None
}

async fn load_open(
    conn: &mut SqliteConnection,
    key: &WindowKey,
) -> Result<Option<Fill>, StoreError> {
    let row = sqlx::query(
        "SELECT id, count, bytes, opened_at, max_requests, max_bytes, upstream_key FROM windows \
         WHERE upstream = $1 AND credential_hash = $2 AND endpoint = $3 AND model = $4 \
         AND scope = $5 AND state = 'open'",
    )
    .bind(&key.upstream)
    .bind(&key.credential_hash)
    .bind(&key.endpoint)
    .bind(&key.model)
    .bind(key.scope.to_stored())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Fill {
        id: WindowId::from_stored(row.try_get("id")?),
        key: key.clone(),
        stored: true,
        count: row.try_get("count")?,
        bytes: row.try_get("bytes")?,
        opened_at: row.try_get("opened_at")?,
        max_requests: row.try_get("max_requests")?,
        max_bytes: row.try_get("max_bytes")?,
        upstream_key: row.try_get("upstream_key")?,
        sealed: None,
    }))
}

async fn write_fill(conn: &mut SqliteConnection, f: &Fill) -> Result<(), StoreError> {
    let (state, sealed_at, reason) = match f.sealed {
        Some((reason, at)) => ("sealed", Some(at), Some(reason.as_str())),
        None => ("open", None, None),
    };
    if f.stored {
        sqlx::query(
            "UPDATE windows SET count = $2, bytes = $3, upstream_key = $4, state = $5, \
             sealed_at = $6, flush_reason = $7 WHERE id = $1 AND state = 'open'",
        )
        .bind(f.id.as_str())
        .bind(f.count)
        .bind(f.bytes)
        .bind(f.upstream_key.as_deref())
        .bind(state)
        .bind(sealed_at)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query(
            "INSERT INTO windows (id, upstream, credential_hash, endpoint, model, state, count, \
             bytes, max_requests, max_bytes, opened_at, sealed_at, flush_reason, upstream_key, scope) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(f.id.as_str())
        .bind(&f.key.upstream)
        .bind(&f.key.credential_hash)
        .bind(&f.key.endpoint)
        .bind(&f.key.model)
        .bind(state)
        .bind(f.count)
        .bind(f.bytes)
        .bind(f.max_requests)
        .bind(f.max_bytes)
        .bind(f.opened_at)
        .bind(sealed_at)
        .bind(reason)
        .bind(f.upstream_key.as_deref())
        .bind(f.key.scope.to_stored())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The run's new requests, one prepared single-row INSERT each through
/// SQLite's C API ([`direct`]).
async fn insert_requests(
    conn: &mut SqliteConnection,
    run: &[&NewRequest],
    fills: &[Fill],
    inserts: &[(usize, usize)],
) -> Result<(), StoreError> {
    direct(conn, |db| {
        let mut insert = db.prepare(
            "INSERT INTO requests (id, credential_hash, upstream, endpoint, model, body, \
             body_hash, idempotency_key, mode, deadline, callback_url, status, window_id, \
             created_at, retry_tag, scope, forward_headers) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
             ?8, ?9, ?10, ?11, 'queued', ?12, ?13, ?14, ?15, ?16)",
        )?;
        for &(i, f) in inserts {
            let r = run[i];
            insert.execute(rusqlite::params![
                r.id.as_str(),
                r.credential_hash.as_str(),
                r.upstream.as_str(),
                r.endpoint.as_str(),
                r.model.as_str(),
                r.body.as_ref(),
                r.body_hash.as_str(),
                r.idempotency_key.as_deref(),
                r.mode.as_str(),
                r.deadline,
                r.callback_url.as_deref(),
                fills[f].id.as_str(),
                r.now,
                retry_tag(r),
                r.scope.to_stored(),
                headers_to_stored(&r.forward_headers),
            ])?;
        }
        Ok(())
    })
    .await
}
