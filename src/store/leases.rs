//! Leases: which replica works a window or a request's realtime call
//! (`deferral::lease` takes and renews them).

use super::ops::Op;
use super::{Lease, Store, StoreError};

impl Store {
    /// Leases `on` to `owner` until `until`, if nobody else holds an
    /// unexpired lease on it; the holder renews its own. A window is
    /// leased only on its way to a job or with one running (sealed,
    /// uploaded, creating or submitted); its holder renews in any state.
    /// Replicas sharing the store take turns this way (`deferral::lease`).
    pub async fn claim_lease(
        &self,
        on: &Lease,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.write(Op::ClaimLease {
            on: on.clone(),
            owner: owner.to_owned(),
            now,
            until,
        })
        .await?
        .applied()
    }

    /// Gives up `owner`'s lease on `on` (false if it no longer held it).
    pub async fn release_lease(&self, on: &Lease, owner: &str) -> Result<bool, StoreError> {
        self.write(Op::ReleaseLease {
            on: on.clone(),
            owner: owner.to_owned(),
        })
        .await?
        .applied()
    }

    /// Gives up every lease `owner` holds (a process on its way out, so the
    /// next one need not wait for them to run out); returns how many.
    pub async fn release_leases_of(&self, owner: &str) -> Result<u64, StoreError> {
        self.write(Op::ReleaseLeasesOf {
            owner: owner.to_owned(),
        })
        .await?
        .count()
    }
}
