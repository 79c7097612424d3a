//! Leases: how replicas sharing one store take turns on a window or a
//! request.
//!
//! Every replica's flusher sees the same sealed windows, every replica's
//! poller the same submitted ones, every replica's deadline worker the same
//! due requests. Work on a window (uploading it, creating or adopting its
//! job, polling and reconciling the job) or a request (sending it realtime)
//! runs under a lease taken in the store, renewed while the work goes on
//! and given up when it ends, so two processes never do it at once; a lease
//! left by a process that died runs out after [`LEASE`].

use std::future::Future;
use std::time::Duration;

use super::engine::{ms, now_ms, Deferral};
use crate::model::{RequestId, WindowId};
use crate::store::{Store, StoreError};

/// How long a lease lasts unless renewed: how long a window waits after
/// its holder died before another process takes it up.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often the holder renews its lease while it works.
const RENEW_EVERY: Duration = Duration::from_secs(3);

/// What a lease is on.
#[derive(Clone, Copy, Debug)]
pub enum Leased<'a> {
    Window(&'a WindowId),
    Request(&'a RequestId),
}

impl Leased<'_> {
    /// Takes or renews the lease from `now` for [`LEASE`].
    async fn claim(self, store: &Store, owner: &str, now: i64) -> Result<bool, StoreError> {
        let until = now + ms(LEASE);
        match self {
            Self::Window(id) => store.claim_window(id, owner, now, until).await,
            Self::Request(id) => store.claim_request(id, owner, now, until).await,
        }
    }

    async fn release(self, store: &Store, owner: &str) -> Result<bool, StoreError> {
        match self {
            Self::Window(id) => store.release_window(id, owner).await,
            Self::Request(id) => store.release_request(id, owner).await,
        }
    }
}

impl std::fmt::Display for Leased<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Window(id) => write!(f, "window {id}"),
            Self::Request(id) => write!(f, "request {id}"),
        }
    }
}

/// The lease ran out while this process worked (it stalled for longer
/// than [`LEASE`]) and another took it.
#[derive(Debug, thiserror::Error)]
#[error("another process took over {0}")]
pub struct LeaseLost(pub String);

/// Runs `work` under the lease on `what`: `None`, with `work` never
/// started, when another process holds it. Losing the lease midway stops
/// the work. The lease is given up when the work ends, failed or not (the
/// next pass, here or in another replica, retries a failure).
pub async fn leased<T, E>(
    deferral: &Deferral,
    what: Leased<'_>,
    work: impl Future<Output = Result<T, E>>,
) -> Result<Option<T>, E>
where
    E: From<StoreError> + From<LeaseLost>,
{
    let owner = deferral.instance.as_str();
    let taken = now_ms();
    if !what.claim(&deferral.store, owner, taken).await? {
        return Ok(None);
    }
    let renew = async {
        let mut held_until = taken + ms(LEASE);
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let now = now_ms();
            match what.claim(&deferral.store, owner, now).await {
                Ok(true) => held_until = now + ms(LEASE),
                Ok(false) => return E::from(LeaseLost(what.to_string())),
                // A store hiccup: the lease still holds for a while, so
                // the work goes on unless it may run out before the next try.
                Err(err) if now + ms(RENEW_EVERY) >= held_until => return E::from(err),
                Err(err) => {
                    tracing::warn!(lease = %what, error = %err, "could not renew a lease; trying again");
                }
            }
        }
    };
    let done = tokio::select! {
        done = work => done,
        lost = renew => Err(lost),
    };
    let released = what.release(&deferral.store, owner).await;
    let value = done?;
    released?;
    Ok(Some(value))
}
