//! The store's face to resolution: applying results (a window's, or one
//! realtime answer), failing what is left, requeueing for resubmission,
//! the savings ledger and purging what `results_ttl` let go.

use super::ops::Op;
use super::{LedgerGroup, LedgerSum, Resolution, Store, StoreError};
use crate::model::{RequestId, WindowId};

impl Store {
    /// Applies each result whose request is still open and still in this
    /// window; returns the ids that changed (wake each waiter once).
    pub async fn resolve(
        &self,
        window: &WindowId,
        resolutions: Vec<Resolution>,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Resolve {
            window: window.clone(),
            resolutions,
        })
        .await?
        .ids()
    }

    /// A realtime fallback's result: applied if the request is still open.
    pub async fn resolve_one(&self, resolution: Resolution) -> Result<bool, StoreError> {
        self.write(Op::ResolveOne(Box::new(resolution)))
            .await?
            .applied()
    }

    /// Fails every still open request of the window ("in neither file").
    pub async fn fail_unresolved(
        &self,
        window: &WindowId,
        code: &str,
        message: &str,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::FailUnresolved {
            window: window.clone(),
            code: code.to_owned(),
            message: message.to_owned(),
            now,
        })
        .await?
        .ids()
    }

    /// Moves open requests back to queued in the open window of their key
    /// (opened if none), for resubmission, counting one resubmission each.
    /// Returns the ids moved. The new window takes the old one's upstream
    /// key when it has none.
    pub async fn requeue(
        &self,
        ids: Vec<RequestId>,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Requeue {
            ids,
            now,
            counted: true,
        })
        .await?
        .ids()
    }

    /// [`Store::requeue`] without counting a resubmission: for requests
    /// whose batch was refused for another request's line.
    pub async fn requeue_uncounted(
        &self,
        ids: Vec<RequestId>,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Requeue {
            ids,
            now,
            counted: false,
        })
        .await?
        .ids()
    }

    /// After a window's job failed, expired or was cancelled: requeues each of
    /// its still open requests resubmitted fewer than `limit` times (counting
    /// one more for each), into the open window of its key, which inherits
    /// the old window's upstream key. Returns the ids moved; the others stay
    /// open in `window` for the next policy.
    pub async fn resubmit(
        &self,
        window: &WindowId,
        limit: u32,
        now: i64,
    ) -> Result<Vec<RequestId>, StoreError> {
        self.write(Op::Resubmit {
            window: window.clone(),
            limit,
            now,
        })
        .await?
        .ids()
    }

    /// The savings ledger summed by `by`, over results completed in
    /// `[from, to)` (Unix ms).
    pub async fn ledger(
        &self,
        by: LedgerGroup,
        from: i64,
        to: i64,
    ) -> Result<Vec<LedgerSum>, StoreError> {
        dispatch!(self.ledger(by, from, to))
    }

    /// Deletes requests finished before `older_than` (results_ttl) and
    /// finished windows; returns the number of requests deleted.
    pub async fn purge_finished(&self, older_than: i64) -> Result<u64, StoreError> {
        self.write(Op::Purge { older_than }).await?.count()
    }
}
