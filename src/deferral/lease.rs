//! Window leases: how replicas sharing one store take turns on a window.
//!
//! Every replica's flusher sees the same sealed windows and every replica's
//! poller the same submitted ones. Work on a window (uploading it, creating
//! or adopting its job, polling and reconciling the job) runs under a lease
//! taken in the store, renewed while the work goes on and given up when it
//! ends, so two processes never do it at once; a lease left by a process
//! that died runs out after [`LEASE`].

use std::future::Future;
use std::time::Duration;

use super::engine::{ms, now_ms, Deferral};
use crate::model::WindowId;
use crate::store::StoreError;

/// How long a lease lasts unless renewed: how long a window waits after
/// its holder died before another process takes it up.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often the holder renews its lease while it works.
const RENEW_EVERY: Duration = Duration::from_secs(3);

/// The lease ran out while this process worked (it stalled for longer
/// than [`LEASE`]) and another took the window.
#[derive(Debug, thiserror::Error)]
#[error("another process took over window {0}")]
pub struct LeaseLost(pub WindowId);

/// Runs `work` under the lease on window `id`: `None`, with `work` never
/// started, when another process holds it. Losing the lease midway stops
/// the work. The lease is given up when the work ends, failed or not (the
/// next pass, here or in another replica, retries a failure).
pub async fn leased<T, E>(
    deferral: &Deferral,
    id: &WindowId,
    work: impl Future<Output = Result<T, E>>,
) -> Result<Option<T>, E>
where
    E: From<StoreError> + From<LeaseLost>,
{
    let owner = deferral.instance.as_str();
    let now = now_ms();
    if !deferral
        .store
        .claim_window(id, owner, now, now + ms(LEASE))
        .await?
    {
        return Ok(None);
    }
    let renew = async {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            let now = now_ms();
            match deferral
                .store
                .claim_window(id, owner, now, now + ms(LEASE))
                .await
            {
                Ok(true) => {}
                Ok(false) => return E::from(LeaseLost(id.clone())),
                Err(err) => return E::from(err),
            }
        }
    };
    let done = tokio::select! {
        done = work => done,
        lost = renew => Err(lost),
    };
    let released = deferral.store.release_window(id, owner).await;
    let value = done?;
    released?;
    Ok(Some(value))
}
