//! A window's results, applied by the SQLite writer through SQLite's C API
//! ([`direct`]) with one prepared single-row `UPDATE` per result, rather
//! than through sqlx with one multi-row `UPDATE … FROM (VALUES …)` per 500
//! (`ops::resolve_many`, which Postgres keeps). Same semantics: a result
//! applies only while its request is still open and in `window`, the first
//! of two results for one request wins, and each request with a callback
//! gets its delivery in the same transaction.

use sqlx::sqlite::SqliteConnection;

use super::model::request_from_sql;
use super::ops::{sqlite_ops, to_i64, LEDGER_DOUBLE_PAID, LEDGER_INSERT};
use super::sqlite_direct::direct;
use super::{Resolution, StoreError};
use crate::model::{RequestId, RequestStatus, WindowId};

/// Applies `resolutions` inside the writer's open transaction; returns the
/// ids whose request changed, in the order given.
pub(crate) async fn resolve(
    conn: &mut SqliteConnection,
    window: &WindowId,
    resolutions: &[Resolution],
) -> Result<Vec<RequestId>, StoreError> {
    let (changed, callbacks) = direct(conn, |db| apply(db, window, resolutions)).await?;
    // Callbacks are the exception in a result file: their deliveries go
    // through the shared outbox code, once the handle is back with sqlx.
    for (id, url, to, at) in &callbacks {
        sqlite_ops::enqueue_delivery(&mut *conn, id, url, *to, *at).await?;
    }
    Ok(changed)
}

type Callback = (RequestId, String, RequestStatus, i64);

fn apply(
    db: &rusqlite::Connection,
    window: &WindowId,
    resolutions: &[Resolution],
) -> Result<(Vec<RequestId>, Vec<Callback>), StoreError> {
    // One statement per final status: each moves only from the states
    // that status may be entered from.
    let mut statements: Vec<(RequestStatus, rusqlite::Statement<'_>)> = Vec::with_capacity(3);
    let mut changed = Vec::with_capacity(resolutions.len());
    let mut callbacks = Vec::new();
    let mut ledger: Option<rusqlite::Statement<'_>> = None;
    let mut double_paid: Option<rusqlite::Statement<'_>> = None;
    for r in resolutions {
        let to = r.status.status();
        let at = match statements.iter().position(|(s, _)| *s == to) {
            Some(at) => at,
            None => {
                let sql = format!(
                    "UPDATE requests SET status = '{}', served_by = ?1, response_status = ?2, \
                     response_body = ?3, error_code = ?4, error_message = ?5, completed_at = ?6 \
                     WHERE id = ?7 AND window_id = ?8 AND status IN ({}) RETURNING callback_url",
                    to.as_str(),
                    request_from_sql(to)
                );
                statements.push((to, db.prepare(&sql)?));
                statements.len() - 1
            }
        };
        let statement = &mut statements[at].1;
        let applied = {
            let mut rows = statement.query(rusqlite::params![
                r.served_by.map(|s| s.as_str()),
                r.response_status,
                r.response_body.as_deref(),
                r.error_code.as_deref(),
                r.error_message.as_deref(),
                r.completed_at,
                r.id.as_str(),
                window.as_str(),
            ])?;
            // No row: the request is not open (an earlier result, a cancel) or
            // not in this window; the result is dropped.
            if let Some(row) = rows.next()? {
                if let Some(url) = row.get::<_, Option<String>>(0)? {
                    callbacks.push((r.id.clone(), url, to, r.completed_at));
                }
                true
            } else {
                false
            }
        };
        if applied {
            if let (Some(charge), Some(served_by)) = (&r.charge, r.served_by) {
                let ledger = match &mut ledger {
                    Some(prepared) => prepared,
                    None => ledger.insert(db.prepare(LEDGER_INSERT)?),
                };
                ledger.execute(rusqlite::params![
                    r.id.as_str(),
                    r.completed_at,
                    served_by.as_str(),
                    to_i64(charge.usage.prompt),
                    to_i64(charge.usage.completion),
                    charge.realtime_nusd,
                    charge.served_nusd,
                ])?;
            }
            changed.push(r.id.clone());
        } else if let (Some(charge), Some(served_by)) = (&r.charge, r.served_by) {
            let double_paid = match &mut double_paid {
                Some(prepared) => prepared,
                None => double_paid.insert(db.prepare(LEDGER_DOUBLE_PAID)?),
            };
            double_paid.execute(rusqlite::params![
                charge.served_nusd,
                r.id.as_str(),
                served_by.as_str(),
            ])?;
        }
    }
    Ok((changed, callbacks))
}
