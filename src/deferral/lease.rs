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
    async fn claim(self, store: &Store, owner: &str) -> Result<bool, StoreError> {
        let now = now_ms();
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
    if !what.claim(&deferral.store, owner).await? {
        return Ok(None);
    }
    let renew = async {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match what.claim(&deferral.store, owner).await {
                Ok(true) => {}
                Ok(false) => return E::from(LeaseLost(what.to_string())),
                Err(err) => return E::from(err),
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
