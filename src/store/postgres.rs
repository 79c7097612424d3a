//! The shared backend: several replicas use one database. Each write is one
//! transaction; every transition is a conditional UPDATE, so concurrent
//! replicas cannot both take a request; a conflict (serialization failure,
//! deadlock, a racing insert of the key's open window or idempotency key) is
//! retried a few times.
//!
//! A write that finishes requests also tells the other replicas, with a
//! `NOTIFY` sent when it commits, so a caller held on one replica is
//! answered as soon as another stores its result ([`PgStore::follow_finished`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio_util::sync::CancellationToken;

use super::error::is_retryable_db;
use super::ops::{pg_migrate, pg_ops as ops, retry_tag, Op, Reply};
use super::{
    CancelOutcome, DueCursor, DueRequest, QueuedDeadline, RequestRecord, StoreError, StoreOptions,
    WindowRecord, WindowState, WindowSummary,
};
use crate::model::{RequestId, RequestStatus, WindowId};

const MIGRATIONS: &[&str] = &[
    include_str!("schema/postgres_v1.sql"),
    include_str!("schema/postgres_v2.sql"),
    include_str!("schema/postgres_v3.sql"),
    include_str!("schema/postgres_v4.sql"),
    include_str!("schema/postgres_v5.sql"),
    include_str!("schema/postgres_v6.sql"),
];

/// Arbitrary but fixed: replicas starting together migrate one at a time.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7305976317)";

const ATTEMPTS: u32 = 5;

/// Where replicas hear of requests another one finished.
const FINISHED_CHANNEL: &str = "carpool_finished";

/// Id bytes per notification: Postgres refuses payloads of 8,000 or more.
const NOTIFY_BYTES: usize = 7_000;

/// How long to wait before listening again after the connection failed.
const RELISTEN: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    horizon: i64,
    /// Marks this handle's notifications, so it does not hear its own.
    origin: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// A schema name we can quote without escaping.
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl PgStore {
    pub(crate) async fn connect(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let mut connect = PgConnectOptions::from_str(url)?;
        if let Some(schema) = &options.pg_schema {
            if !valid_schema(schema) {
                return Err(StoreError::BadSchemaName {
                    name: schema.clone(),
                });
            }
            let mut admin = connect.connect().await?;
            sqlx::raw_sql(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .execute(&mut admin)
                .await?;
            let _ = admin.close().await;
            connect = connect.options([("search_path", schema.as_str())]);
        }
        let mut conn = connect.connect().await?;
        pg_migrate::migrate(&mut conn, MIGRATION_LOCK, MIGRATIONS).await?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .connect_with(connect)
            .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                horizon: options.retry_horizon_ms,
                origin: RequestId::generate().as_str()[4..].to_owned(),
            }),
        })
    }

    pub(crate) async fn close(&self) {
        self.inner.pool.close().await;
    }

    pub(crate) async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write_once(&op).await {
                Err(StoreError::Database(e)) if attempt < ATTEMPTS && is_retryable_db(&e) => {
                    continue
                }
                other => return other,
            }
        }
    }

    async fn write_once(&self, op: &Op) -> Result<Reply, StoreError> {
        let mut tx = self.inner.pool.begin().await?;
        if let Op::Accept(r) = op {
            // Identical calls of one credential take turns, so an SDK retry
            // racing its original finds it (idempotency keys have a unique
            // index; retries have none to lean on).
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(retry_tag(r))
                .execute(&mut *tx)
                .await?;
        }
        let reply = ops::apply(&mut tx, op, self.inner.horizon).await?;
        let finished = finished_ids(op, &reply);
        if !finished.is_empty() {
            // Delivered on commit, and only then.
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(FINISHED_CHANNEL)
                .bind(payloads(&self.inner.origin, &finished))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(reply)
    }

    /// Calls `wake` with the ids of requests that other store handles (other
    /// replicas) finished, as each commits, until `shutdown`; `listening`
    /// says when it starts and stops hearing them. What is sent while the
    /// connection is down is lost: held callers also re-read the store now
    /// and then.
    pub(crate) async fn follow_finished(
        &self,
        shutdown: &CancellationToken,
        listening: &(dyn Fn(bool) + Send + Sync),
        wake: &(dyn Fn(&[RequestId]) + Send + Sync),
    ) {
        loop {
            let heard_all = async {
                let mut listener = PgListener::connect_with(&self.inner.pool).await?;
                listener.listen(FINISHED_CHANNEL).await?;
                listening(true);
                // `None`: the connection was lost, and whatever was sent
                // meanwhile with it; say so, then listen again.
                while let Some(note) = listener.try_recv().await? {
                    if let Some(ids) = heard(&self.inner.origin, note.payload()) {
                        wake(&ids);
                    }
                }
                Ok::<(), sqlx::Error>(())
            };
            let ended = tokio::select! {
                () = shutdown.cancelled() => None,
                ended = heard_all => Some(ended),
            };
            listening(false);
            match ended {
                None => return,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "not hearing other replicas' results; listening again");
                }
                Some(Ok(())) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RELISTEN) => {}
            }
        }
    }

    pub(crate) async fn get(
        &self,
        id: &RequestId,
        credential_hash: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        ops::get(&mut *self.inner.pool.acquire().await?, id, credential_hash).await
    }

    pub(crate) async fn list(
        &self,
        credential_hash: &str,
        status: Option<RequestStatus>,
        limit: u32,
        after: Option<&RequestId>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let mut conn = self.inner.pool.acquire().await?;
        ops::list(&mut conn, credential_hash, status, limit, after).await
    }

    pub(crate) async fn request_body(&self, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
        ops::request_body(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn request_headers(
        &self,
        id: &RequestId,
    ) -> Result<Vec<(String, String)>, StoreError> {
        ops::request_headers(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn due_requests(
        &self,
        before: i64,
        after: Option<&DueCursor>,
        limit: u32,
    ) -> Result<Vec<DueRequest>, StoreError> {
        ops::due_requests(&mut *self.inner.pool.acquire().await?, before, after, limit).await
    }

    pub(crate) async fn queued_deadlines(
        &self,
        window: &WindowId,
    ) -> Result<Vec<QueuedDeadline>, StoreError> {
        ops::queued_deadlines(&mut *self.inner.pool.acquire().await?, window).await
    }

    pub(crate) async fn open_request_ids(
        &self,
        window: &WindowId,
    ) -> Result<Vec<RequestId>, StoreError> {
        ops::open_request_ids(&mut *self.inner.pool.acquire().await?, window).await
    }

    /// One round trip on a pooled connection: the store answers.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.inner.pool.acquire().await?)
            .await?;
        Ok(())
    }

    pub(crate) async fn open_windows(&self) -> Result<Vec<WindowSummary>, StoreError> {
        ops::open_windows(&mut *self.inner.pool.acquire().await?).await
    }

    pub(crate) async fn window(&self, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
        ops::window(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn windows_in(
        &self,
        states: &[WindowState],
    ) -> Result<Vec<WindowRecord>, StoreError> {
        ops::windows_in(&mut *self.inner.pool.acquire().await?, states).await
    }

    pub(crate) async fn request_counts(
        &self,
    ) -> Result<Vec<(crate::model::RequestStatus, u64)>, StoreError> {
        ops::request_counts(&mut *self.inner.pool.acquire().await?).await
    }

    // ---- failure policies: resubmission, openness, pending counts ----
    pub(crate) async fn is_open(&self, id: &RequestId) -> Result<bool, StoreError> {
        ops::is_open(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn pending_by_credential(&self) -> Result<Vec<super::Pending>, StoreError> {
        ops::pending_by_credential(&mut *self.inner.pool.acquire().await?).await
    }

    pub(crate) async fn ledger(
        &self,
        by: super::LedgerGroup,
        from: i64,
        to: i64,
    ) -> Result<Vec<super::LedgerSum>, StoreError> {
        ops::ledger(&mut *self.inner.pool.acquire().await?, by, from, to).await
    }

    pub(crate) fn window_lines(
        &self,
        id: WindowId,
    ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
        ops::window_lines(self.inner.pool.clone(), id)
    }
}

/// The requests `op` finished, by its `reply`: what held callers elsewhere
/// are told of.
fn finished_ids<'a>(op: &'a Op, reply: &'a Reply) -> Vec<&'a RequestId> {
    match (op, reply) {
        (Op::Resolve { .. } | Op::FailUnresolved { .. }, Reply::Ids(ids)) => ids.iter().collect(),
        (Op::ResolveOne(r), Reply::Applied(true)) => vec![&r.id],
        (Op::Cancel { id, .. }, Reply::Cancel(outcome))
            if matches!(**outcome, CancelOutcome::Cancelled(_)) =>
        {
            vec![id]
        }
        _ => Vec::new(),
    }
}

/// `origin:id,id,…` payloads, each under the notification size limit.
fn payloads(origin: &str, ids: &[&RequestId]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for id in ids {
        if !current.is_empty() && current.len() + id.as_str().len() + 1 > NOTIFY_BYTES {
            out.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(origin);
            current.push(':');
        } else {
            current.push(',');
        }
        current.push_str(id.as_str());
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The ids of a payload another handle sent; `None` for our own or one we
/// cannot read.
fn heard(origin: &str, payload: &str) -> Option<Vec<RequestId>> {
    let (from, ids) = payload.split_once(':')?;
    if from == origin {
        return None;
    }
    Some(ids.split(',').filter_map(RequestId::parse).collect())
}

// ---- webhook outbox reads (outbox.rs) ----------------------------------------
impl PgStore {
    pub(crate) async fn dead_letters(
        &self,
        limit: u32,
    ) -> Result<Vec<super::DeliveryRecord>, StoreError> {
        ops::dead_letters(&mut *self.inner.pool.acquire().await?, limit).await
    }

    pub(crate) async fn delivery(
        &self,
        id: &crate::model::DeliveryId,
    ) -> Result<Option<super::DeliveryRecord>, StoreError> {
        ops::delivery_by_id(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn outbox_pending(&self) -> Result<(u64, Option<i64>), StoreError> {
        ops::outbox_pending(&mut *self.inner.pool.acquire().await?).await
    }

    pub(crate) async fn request_by_id(
        &self,
        id: &RequestId,
    ) -> Result<Option<RequestRecord>, StoreError> {
        ops::request_by_id(&mut *self.inner.pool.acquire().await?, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_carry_every_id_once() {
        let ids: Vec<RequestId> = (0..1_000).map(|_| RequestId::generate()).collect();
        let refs: Vec<&RequestId> = ids.iter().collect();
        let sent = payloads("me", &refs);
        assert!(sent.len() > 1);
        assert!(sent.iter().all(|p| p.len() < 8_000));
        assert!(heard("me", &sent[0]).is_none(), "our own notification");
        let back: Vec<RequestId> = sent
            .iter()
            .flat_map(|p| heard("them", p).unwrap())
            .collect();
        assert_eq!(back, ids);
        assert!(payloads("me", &[]).is_empty());
        assert_eq!(heard("them", "no separator"), None);
        assert_eq!(
            heard("them", "x:not-an-id").unwrap(),
            Vec::<RequestId>::new()
        );
    }
}
