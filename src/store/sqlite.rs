//! The embedded backend. Every write goes to one writer task that
//! group-commits: it takes whatever commands are queued (up to a cap), runs
//! them in one transaction and answers each only after the commit, so intake
//! costs one fsync per group rather than per request. A command that fails
//! before writing (an idempotency conflict) keeps its group; any other
//! failure rolls the group back and replays its commands one transaction
//! each, so one bad command never fails the others. Reads use a separate
//! pool and see only committed data (WAL).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::{mpsc, oneshot};

use super::ops::{sqlite_migrate, sqlite_ops as ops, Op, Reply};
use super::{sqlite_checkpoint, sqlite_intake, sqlite_resolve};
use super::{
    DueCursor, DueRequest, NewRequest, QueuedDeadline, RequestRecord, StoreError, StoreOptions,
    WindowRecord, WindowState, WindowSummary,
};
use crate::model::{RequestId, RequestStatus, WindowId};

const MIGRATIONS: &[&str] = &[
    include_str!("schema/sqlite_v1.sql"),
    include_str!("schema/sqlite_v2.sql"),
    include_str!("schema/sqlite_v3.sql"),
    include_str!("schema/sqlite_v4.sql"),
    include_str!("schema/sqlite_v5.sql"),
    include_str!("schema/sqlite_v6.sql"),
];

/// Commands waiting for the writer; intake beyond this waits (backpressure).
const QUEUE_DEPTH: usize = 16_384;

/// Rows sqlx's connection thread may hand the writer before it waits for
/// them to be taken. Its default (50) is smaller than the `RETURNING` of
/// the writer's many-row statements (a window's unanswered requests failed
/// at once, say), and every time it fills, the two threads wake each other
/// by turns.
const ROW_BUFFER: usize = 1_000;

enum Msg {
    Write(Op, oneshot::Sender<Result<Reply, StoreError>>),
    Close(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<Msg>,
    read: SqlitePool,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    pub(crate) async fn connect(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        // The writer and the read pool would each get a database of their own.
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::UnsupportedUrl {
                scheme: "sqlite in-memory".to_owned(),
            });
        }
        let connect = SqliteConnectOptions::from_str(url)?;
        // SQLite creates the file, not its folder: `sqlite://data/carpool.db`
        // on a fresh checkout would fail with "unable to open database file".
        if let Some(dir) = connect.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        let connect = connect
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        // The writer keeps the hot index pages cached (a ceiling, not an
        // allocation; readers keep SQLite's default of 2 MiB). 8 MiB holds
        // the index tails intake and results work on; marking a large
        // window submitted fills it either way, so a bigger cache only
        // made a flush's peak memory grow with the window (with 32 MiB:
        // 58 MiB at 50,000 lines, 61 MiB at 100,000; with 8 MiB, 37 MiB
        // for both, at the same intake and fan-out rates).
        let mut conn = connect
            .clone()
            .pragma("cache_size", "-8192")
            .row_buffer_size(ROW_BUFFER)
            .connect()
            .await?;
        sqlite_migrate::migrate(&mut conn, "", MIGRATIONS).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .connect_with(connect.clone())
            .await?;
        // Late, so that little can fail after it and leave the checkpointer
        // waiting on a hook nobody releases (only the thread's start).
        let wal_hook = sqlite_checkpoint::start(&mut conn, &connect).await?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let cap = options.group_commit_max.max(1);
        let horizon = options.retry_horizon_ms;
        // Its own thread and runtime: each group commit is several
        // statements, each a round trip to sqlx's connection thread, and on
        // the shared runtime every round trip would wait its turn behind
        // all the HTTP tasks that are ready. Here it resumes at once.
        std::thread::Builder::new()
            .name("carpool-sqlite-writer".to_owned())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        runtime.block_on(run_writer(conn, rx, cap, horizon));
                        // The connection is closed: no commit calls the hook.
                        wal_hook.release();
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot start the SQLite writer's runtime");
                    }
                }
            })
            .map_err(StoreError::WriterThread)?;
        Ok(Self {
            inner: Arc::new(Inner { writer: tx, read }),
        })
    }

    pub(crate) async fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.inner.writer.send(Msg::Close(ack)).await.is_ok() {
            let _ = done.await;
        }
        self.inner.read.close().await;
    }

    pub(crate) async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .writer
            .send(Msg::Write(op, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    pub(crate) async fn get(
        &self,
        id: &RequestId,
        credential_hash: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        ops::get(&mut *self.inner.read.acquire().await?, id, credential_hash).await
    }

    pub(crate) async fn list(
        &self,
        credential_hash: &str,
        status: Option<RequestStatus>,
        limit: u32,
        after: Option<&RequestId>,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let mut conn = self.inner.read.acquire().await?;
        ops::list(&mut conn, credential_hash, status, limit, after).await
    }

    pub(crate) async fn request_body(&self, id: &RequestId) -> Result<Option<Bytes>, StoreError> {
        ops::request_body(&mut *self.inner.read.acquire().await?, id).await
    }

    pub(crate) async fn request_headers(
        &self,
        id: &RequestId,
    ) -> Result<Vec<(String, String)>, StoreError> {
        ops::request_headers(&mut *self.inner.read.acquire().await?, id).await
    }

    pub(crate) async fn due_requests(
        &self,
        before: i64,
        after: Option<&DueCursor>,
        limit: u32,
    ) -> Result<Vec<DueRequest>, StoreError> {
        ops::due_requests(&mut *self.inner.read.acquire().await?, before, after, limit).await
    }

    pub(crate) async fn queued_deadlines(
        &self,
        window: &WindowId,
    ) -> Result<Vec<QueuedDeadline>, StoreError> {
        ops::queued_deadlines(&mut *self.inner.read.acquire().await?, window).await
    }

    pub(crate) async fn open_request_ids(
        &self,
        window: &WindowId,
    ) -> Result<Vec<RequestId>, StoreError> {
        ops::open_request_ids(&mut *self.inner.read.acquire().await?, window).await
    }

    /// One round trip on a pooled connection: the store answers.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.inner.read.acquire().await?)
            .await?;
        Ok(())
    }

    pub(crate) async fn open_windows(&self) -> Result<Vec<WindowSummary>, StoreError> {
        ops::open_windows(&mut *self.inner.read.acquire().await?).await
    }

    pub(crate) async fn window(&self, id: &WindowId) -> Result<Option<WindowRecord>, StoreError> {
        ops::window(&mut *self.inner.read.acquire().await?, id).await
    }

    pub(crate) async fn windows_in(
        &self,
        states: &[WindowState],
    ) -> Result<Vec<WindowRecord>, StoreError> {
        ops::windows_in(&mut *self.inner.read.acquire().await?, states).await
    }

    pub(crate) async fn request_counts(
        &self,
    ) -> Result<Vec<(crate::model::RequestStatus, u64)>, StoreError> {
        ops::request_counts(&mut *self.inner.read.acquire().await?).await
    }

    // ---- failure policies: resubmission, openness, pending counts ----
    pub(crate) async fn is_open(&self, id: &RequestId) -> Result<bool, StoreError> {
        ops::is_open(&mut *self.inner.read.acquire().await?, id).await
    }

    pub(crate) async fn pending_by_credential(&self) -> Result<Vec<super::Pending>, StoreError> {
        ops::pending_by_credential(&mut *self.inner.read.acquire().await?).await
    }

    pub(crate) async fn ledger(
        &self,
        by: super::LedgerGroup,
        from: i64,
        to: i64,
    ) -> Result<Vec<super::LedgerSum>, StoreError> {
        ops::ledger(&mut *self.inner.read.acquire().await?, by, from, to).await
    }

    pub(crate) fn window_lines(
        &self,
        id: WindowId,
    ) -> BoxStream<'static, Result<(RequestId, Bytes), StoreError>> {
        ops::window_lines(self.inner.read.clone(), id)
    }
}

struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

async fn run_writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Msg>,
    cap: usize,
    horizon: i64,
) {
    let mut group: Vec<Pending> = Vec::with_capacity(cap);
    let mut closing = None;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Write(op, reply) => group.push(Pending { op, reply }),
                Msg::Close(ack) => {
                    closing = Some(ack);
                    break;
                }
            }
            if group.len() < cap {
                next = rx.try_recv().ok();
            }
        }
        commit_group(&mut conn, &mut group, horizon).await;
        if let Some(ack) = closing.take() {
            rx.close();
            // Commands sent before the close was seen still get answered.
            while let Ok(Msg::Write(op, reply)) = rx.try_recv() {
                group.push(Pending { op, reply });
            }
            commit_group(&mut conn, &mut group, horizon).await;
            let _ = conn.close().await;
            let _ = ack.send(());
            return;
        }
    }
    let _ = conn.close().await;
}

async fn commit_group(conn: &mut SqliteConnection, group: &mut Vec<Pending>, horizon: i64) {
    if group.is_empty() {
        return;
    }
    match try_group(conn, group, horizon).await {
        Ok(results) => {
            for (pending, result) in group.drain(..).zip(results) {
                let _ = pending.reply.send(result);
            }
        }
        Err(error) => {
            tracing::warn!(%error, size = group.len(), "group commit failed; replaying its commands one by one");
            for pending in group.drain(..) {
                let result = alone(conn, &pending.op, horizon).await;
                let _ = pending.reply.send(result);
            }
        }
    }
}

async fn try_group(
    conn: &mut SqliteConnection,
    group: &[Pending],
    horizon: i64,
) -> Result<Vec<Result<Reply, StoreError>>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut results = Vec::with_capacity(group.len());
    let mut rest = group;
    while let Some(pending) = rest.first() {
        let run: Vec<&NewRequest> = rest
            .iter()
            .map_while(|p| match &p.op {
                Op::Accept(r) => Some(&**r),
                _ => None,
            })
            .collect();
        if run.is_empty() {
            match apply(&mut tx, &pending.op, horizon).await {
                Ok(reply) => results.push(Ok(reply)),
                Err(e) if e.wrote_nothing() => results.push(Err(e)),
                Err(e) => return Err(e),
            }
            rest = &rest[1..];
        } else {
            let accepted = sqlite_intake::accept_run(&mut tx, &run, horizon).await?;
            results.extend(
                accepted
                    .into_iter()
                    .map(|a| a.map(|a| Reply::Accepted(Box::new(a)))),
            );
            rest = &rest[run.len()..];
        }
    }
    tx.commit().await?;
    Ok(results)
}

/// One command inside the writer's transaction: a window's results take
/// the writer's own path (`sqlite_resolve`), everything else the shared one.
async fn apply(conn: &mut SqliteConnection, op: &Op, horizon: i64) -> Result<Reply, StoreError> {
    match op {
        Op::Resolve {
            window,
            resolutions,
        } => Ok(Reply::Ids(
            sqlite_resolve::resolve(conn, window, resolutions).await?,
        )),
        _ => ops::apply(conn, op, horizon).await,
    }
}

async fn alone(conn: &mut SqliteConnection, op: &Op, horizon: i64) -> Result<Reply, StoreError> {
    let mut tx = conn.begin().await?;
    match apply(&mut tx, op, horizon).await {
        Ok(reply) => {
            tx.commit().await?;
            Ok(reply)
        }
        Err(e) => {
            tx.rollback().await?;
            Err(e)
        }
    }
}

// ---- webhook outbox reads (outbox.rs) ----------------------------------------
impl SqliteStore {
    pub(crate) async fn dead_letters(
        &self,
        limit: u32,
    ) -> Result<Vec<super::DeliveryRecord>, StoreError> {
        ops::dead_letters(&mut *self.inner.read.acquire().await?, limit).await
    }

    pub(crate) async fn delivery(
        &self,
        id: &crate::model::DeliveryId,
    ) -> Result<Option<super::DeliveryRecord>, StoreError> {
        ops::delivery_by_id(&mut *self.inner.read.acquire().await?, id).await
    }

    pub(crate) async fn outbox_pending(&self) -> Result<(u64, Option<i64>), StoreError> {
        ops::outbox_pending(&mut *self.inner.read.acquire().await?).await
    }

    pub(crate) async fn request_by_id(
        &self,
        id: &RequestId,
    ) -> Result<Option<RequestRecord>, StoreError> {
        ops::request_by_id(&mut *self.inner.read.acquire().await?, id).await
    }
}
