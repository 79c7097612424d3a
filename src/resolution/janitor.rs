//! The janitor: results stay retrievable for `results_ttl` after they are
//! stored, then they (and finished windows) are deleted. Each pass, from
//! the start, also deletes orphaned input files at the provider
//! ([`super::orphans::sweep`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deferral::engine::{ms, now_ms, Deferral};

/// How often to purge: a tenth of the TTL, between 1 s and 1 h.
pub fn purge_every(results_ttl: Duration) -> Duration {
    (results_ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

pub async fn run(deferral: Deferral, shutdown: CancellationToken) {
    let ttl = deferral.config.batching.results_ttl;
    let every = purge_every(ttl);
    loop {
        match deferral.store.purge_finished(now_ms() - ms(ttl)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(requests = n, "purged results older than results_ttl"),
            Err(err) => tracing::warn!(error = %err, "purging old results failed; will retry"),
        }
        match super::orphans::sweep(&deferral).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "deleted orphaned provider input files"),
            Err(err) => {
                tracing::warn!(error = %err, "looking for orphaned input files failed; will retry")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_a_tenth_of_the_ttl_within_bounds() {
        assert_eq!(
            purge_every(Duration::from_secs(7 * 86400)),
            Duration::from_secs(3600)
        );
        assert_eq!(
            purge_every(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(
            purge_every(Duration::from_millis(200)),
            Duration::from_secs(1)
        );
    }
}
