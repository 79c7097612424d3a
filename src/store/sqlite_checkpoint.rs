//! Checkpoints off the writer's path. SQLite copies the WAL back into the
//! database file (a checkpoint, with its `fsync`) inside the commit that
//! takes the WAL past `wal_autocheckpoint` pages, so the writer, and every
//! caller waiting on its next group, waits for the copy. Here the writer's
//! commit only rings a doorbell every [`BACKGROUND_EVERY`] new WAL pages,
//! and a connection of its own copies them (`PASSIVE`: it blocks neither
//! the writer nor a reader) while the writer goes on, on another core when
//! there is one. If that copy falls behind (the WAL past [`INLINE_AT`]
//! pages: a writer faster than the copy, or a reader holding an old
//! snapshot), the committing connection checkpoints itself, as SQLite's
//! own hook does.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicI32, Ordering};

use rusqlite::ffi;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::{mpsc, watch};

use super::StoreError;

/// New WAL pages between two background checkpoints: SQLite's default
/// `wal_autocheckpoint`.
const BACKGROUND_EVERY: c_int = 1_000;

/// WAL pages past which the committing connection checkpoints itself
/// (64 MiB of 4 KiB pages).
const INLINE_AT: c_int = 16_384;

/// What the writer's WAL hook reaches.
struct Doorbell {
    ring: mpsc::Sender<()>,
    /// WAL pages when the bell last rang; only the hook touches it, and
    /// SQLite calls the hook of one connection one commit at a time.
    rung_at: AtomicI32,
}

/// The writer's WAL hook, installed by [`start`]: hand it back with
/// [`WalHook::release`] once the writer's connection is closed.
pub(crate) struct WalHook {
    doorbell: *mut Doorbell,
    /// Background checkpoints run so far.
    #[cfg_attr(not(test), allow(dead_code))]
    done: watch::Receiver<u64>,
}

// SAFETY: the pointer is only dereferenced by the hook and by `release`;
// `Doorbell` is `Send + Sync`.
#[allow(unsafe_code)]
unsafe impl Send for WalHook {}

/// Starts the checkpointer on a connection of its own and hooks `writer`'s
/// commits to it. The checkpointer ends when the hook is released.
pub(crate) async fn start(
    writer: &mut SqliteConnection,
    options: &SqliteConnectOptions,
) -> Result<WalHook, StoreError> {
    let mut conn = options.connect().await?;
    let (ring, mut rung) = mpsc::channel(1);
    let (count, done) = watch::channel(0);
    tokio::spawn(async move {
        while rung.recv().await.is_some() {
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut conn)
                .await
            {
                tracing::warn!(%error, "background checkpoint failed; the writer checkpoints past the WAL's ceiling");
            }
            count.send_modify(|n| *n += 1);
        }
        let _ = conn.close().await;
    });
    // A raw pointer only once the handle is locked: if locking fails, the
    // bell drops and the checkpointer ends.
    let doorbell = Box::new(Doorbell {
        ring,
        rung_at: AtomicI32::new(0),
    });
    let mut handle = writer.lock_handle().await?;
    let doorbell = Box::into_raw(doorbell);
    // SAFETY: the handle is locked away from sqlx's thread while the hook
    // is set; `doorbell` lives until `release`, which runs only after the
    // connection is closed, when no commit can call the hook any more.
    #[allow(unsafe_code)]
    unsafe {
        ffi::sqlite3_wal_hook(
            handle.as_raw_handle().as_ptr(),
            Some(on_commit),
            doorbell.cast(),
        );
    }
    Ok(WalHook { doorbell, done })
}

impl WalHook {
    /// Frees the hook's state; call only once the writer's connection is
    /// closed. If the writer stops any other way the state (a few bytes)
    /// is left behind rather than freed under a commit that may still run.
    pub(crate) fn release(self) {
        // SAFETY: from `Box::into_raw` in `start`, released once (by value).
        #[allow(unsafe_code)]
        drop(unsafe { Box::from_raw(self.doorbell) });
    }
}

/// What a commit that left `pages` in the WAL does, the bell having last
/// rung at `rung_at` pages.
#[derive(Debug, PartialEq, Eq)]
enum AfterCommit {
    /// Checkpoint on the committing connection: the WAL is at its ceiling.
    Inline,
    /// Ring the checkpointer; the bell has now rung at this many pages.
    Ring(c_int),
    /// Nothing yet; the bell has rung at this many pages (0 once the WAL
    /// started over).
    Wait(c_int),
}

fn after_commit(pages: c_int, rung_at: c_int) -> AfterCommit {
    if pages >= INLINE_AT {
        return AfterCommit::Inline;
    }
    // Fewer pages than at the last ring: the WAL started over from its
    // beginning, after a checkpoint that copied all of it.
    let rung_at = if pages < rung_at { 0 } else { rung_at };
    if pages - rung_at >= BACKGROUND_EVERY {
        AfterCommit::Ring(pages)
    } else {
        AfterCommit::Wait(rung_at)
    }
}

/// Called by SQLite after each commit of the writer's connection, with the
/// WAL's size in pages.
#[allow(unsafe_code)]
unsafe extern "C" fn on_commit(
    doorbell: *mut c_void,
    db: *mut ffi::sqlite3,
    name: *const c_char,
    pages: c_int,
) -> c_int {
    // SAFETY: the `Doorbell` set with this hook, alive until `release`.
    let doorbell = unsafe { &*doorbell.cast::<Doorbell>() };
    match after_commit(pages, doorbell.rung_at.load(Ordering::Relaxed)) {
        AfterCommit::Inline => {
            // As SQLite's own hook does; what it returns is for the next
            // commit to see.
            // SAFETY: SQLite's own arguments, passed on during its callback.
            unsafe { ffi::sqlite3_wal_checkpoint(db, name) };
        }
        AfterCommit::Ring(pages) => {
            // Full: a checkpoint is already due, and it copies these too.
            let _ = doorbell.ring.try_send(());
            doorbell.rung_at.store(pages, Ordering::Relaxed);
        }
        AfterCommit::Wait(rung_at) => doorbell.rung_at.store(rung_at, Ordering::Relaxed),
    }
    ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
    use sqlx::Row as _;

    use super::*;

    #[tokio::test]
    async fn a_commit_past_a_thousand_pages_is_copied_back_by_the_checkpointer() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("store.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let mut writer = options.connect().await.expect("writer");
        let mut hook = start(&mut writer, &options).await.expect("hook");
        sqlx::query("CREATE TABLE t (b BLOB NOT NULL)")
            .execute(&mut writer)
            .await
            .expect("table");
        // About 1,500 pages of 4 KiB in one commit.
        let mut tx = writer.begin().await.expect("begin");
        for _ in 0..1_500 {
            sqlx::query("INSERT INTO t VALUES (zeroblob(4000))")
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        tokio::time::timeout(Duration::from_secs(30), hook.done.wait_for(|n| *n >= 1))
            .await
            .expect("a background checkpoint within 30 s")
            .expect("the checkpointer is running");
        // All of it was copied back, so the next commit starts the WAL over.
        sqlx::query("INSERT INTO t VALUES (x'00')")
            .execute(&mut writer)
            .await
            .expect("insert");
        let mut other = options.connect().await.expect("reader");
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut other)
            .await
            .expect("checkpoint");
        let wal_pages: i64 = row.get(1);
        assert!(wal_pages < 10, "the WAL holds {wal_pages} pages");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut other)
            .await
            .expect("count");
        assert_eq!(rows, 1_501);
        writer.close().await.expect("close");
        hook.release();
    }

    #[test]
    fn rings_every_thousand_new_pages_and_again_after_the_wal_starts_over() {
        assert_eq!(after_commit(999, 0), AfterCommit::Wait(0));
        assert_eq!(after_commit(1_000, 0), AfterCommit::Ring(1_000));
        assert_eq!(after_commit(1_999, 1_000), AfterCommit::Wait(1_000));
        assert_eq!(after_commit(2_400, 1_000), AfterCommit::Ring(2_400));
        // Started over: counted from nothing again.
        assert_eq!(after_commit(300, 2_400), AfterCommit::Wait(0));
        assert_eq!(after_commit(1_200, 2_400), AfterCommit::Ring(1_200));
    }

    #[test]
    fn the_committer_checkpoints_itself_at_the_ceiling() {
        assert_eq!(
            after_commit(INLINE_AT - 1, INLINE_AT - 2),
            AfterCommit::Wait(INLINE_AT - 2)
        );
        assert_eq!(after_commit(INLINE_AT, INLINE_AT - 1), AfterCommit::Inline);
        assert_eq!(after_commit(INLINE_AT + 5_000, 0), AfterCommit::Inline);
    }
}
