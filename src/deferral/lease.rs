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
use crate::store::{Lease, StoreError};

/// How long a lease lasts unless renewed: how long a window waits after
/// its holder died before another process takes it up.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often the holder renews its lease while it works.
const RENEW_EVERY: Duration = Duration::from_secs(3);

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
    what: Lease,
    work: impl Future<Output = Result<T, E>>,
) -> Result<Option<T>, E>
where
    E: From<StoreError> + From<LeaseLost>,
{
    let owner = deferral.instance.as_str();
    let store = &deferral.store;
    let taken = now_ms();
    if !store
        .claim_lease(&what, owner, taken, taken + ms(LEASE))
        .await?
    {
        return Ok(None);
    }
    let renew = async {
        let mut held_until = taken + ms(LEASE);
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let now = now_ms();
            match store.claim_lease(&what, owner, now, now + ms(LEASE)).await {
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
    let released = store.release_lease(&what, owner).await;
    let value = done?;
    released?;
    Ok(Some(value))
}
