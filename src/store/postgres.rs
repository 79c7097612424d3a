//! The shared backend: several replicas use one database. Each write is one
//! transaction; every transition is a conditional UPDATE, so concurrent
//! replicas cannot both take a request; a conflict (serialization failure,
//! deadlock, a racing insert of the key's open window or idempotency key) is
//! retried a few times.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};

use super::error::is_retryable_db;
use super::ops::{pg_migrate, pg_ops as ops, retry_tag, Op, Reply};
use super::{RequestRecord, StoreError, StoreOptions, WindowRecord, WindowState, WindowSummary};
use crate::model::{RequestId, RequestStatus, WindowId};

const MIGRATIONS: &[&str] = &[
    include_str!("schema/postgres_v1.sql"),
    include_str!("schema/postgres_v2.sql"),
];

/// Arbitrary but fixed: replicas starting together migrate one at a time.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7305976317)";

const ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    horizon: i64,
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
        tx.commit().await?;
        Ok(reply)
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

    pub(crate) async fn due_requests(
        &self,
        before: i64,
        limit: u32,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        ops::due_requests(&mut *self.inner.pool.acquire().await?, before, limit).await
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

    // ---- failure policies: resubmission, openness, pending counts ----
    pub(crate) async fn is_open(&self, id: &RequestId) -> Result<bool, StoreError> {
        ops::is_open(&mut *self.inner.pool.acquire().await?, id).await
    }

    pub(crate) async fn pending_by_credential(&self) -> Result<Vec<(String, u64)>, StoreError> {
        ops::pending_by_credential(&mut *self.inner.pool.acquire().await?).await
    }

    pub(crate) fn window_lines(
        &self,
        id: WindowId,
    ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
        ops::window_lines(self.inner.pool.clone(), id)
    }
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
