//! SQLite's C API on the writer's own connection, for the writes where
//! going through sqlx costs more than SQLite itself: every statement sent
//! through sqlx is a round trip to its connection thread and every bound
//! value a copy. [`direct`] lends the connection to rusqlite, locked out of
//! sqlx's connection thread, inside whatever transaction is open on it.

use std::ptr::NonNull;

use sqlx::sqlite::SqliteConnection;

use super::StoreError;

/// Runs `f` on `conn`'s database handle, on this thread.
pub(crate) async fn direct<T>(
    conn: &mut SqliteConnection,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut handle = conn.lock_handle().await?;
    let raw: NonNull<rusqlite::ffi::sqlite3> = handle.as_raw_handle();
    // SAFETY: `handle` keeps sqlx's connection thread away from this
    // database handle until it is dropped, after `db`. `from_handle`
    // borrows the handle: dropping `db` neither closes the database nor
    // finalizes any statement of sqlx's, and rusqlite finalizes its own
    // statements when they drop, which is before `db` drops.
    #[allow(unsafe_code)]
    let db = unsafe { rusqlite::Connection::from_handle(raw.as_ptr()) }?;
    f(&db)
}
