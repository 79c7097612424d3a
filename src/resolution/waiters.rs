//! Wakes callers held on a request when its result is stored.
//!
//! Only a wake-up: the result itself is always read from the store, so a
//! missed or early wake costs a re-read, never a wrong answer. A waiter
//! registers before it reads, so a result stored in between still wakes it.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::Notify;

use tokio_util::sync::CancellationToken;

use crate::deferral::Deferral;
use crate::model::RequestId;

#[derive(Clone, Default)]
pub struct Waiters {
    map: Arc<DashMap<RequestId, Arc<Notify>>>,
    /// Rings on every wake, for workers that follow every stored result
    /// (the webhook outbox).
    stored: Arc<Notify>,
}

/// A registration; dropping it forgets the entry once nobody else holds it.
pub struct Waiter {
    id: RequestId,
    notify: Arc<Notify>,
    map: Arc<DashMap<RequestId, Arc<Notify>>>,
}

impl Waiters {
    pub fn register(&self, id: &RequestId) -> Waiter {
        let notify = self.map.entry(id.clone()).or_default().clone();
        Waiter {
            id: id.clone(),
            notify,
            map: self.map.clone(),
        }
    }

    pub fn wake(&self, ids: &[RequestId]) {
        if !ids.is_empty() {
            self.stored.notify_one();
        }
        for id in ids {
            if let Some(notify) = self.map.get(id) {
                notify.notify_waiters();
            }
        }
    }

    /// Rings (one stored permit) whenever any request is woken.
    pub fn stored(&self) -> &Arc<Notify> {
        &self.stored
    }

    /// Whether a caller held by this process waits for `id` right now.
    pub fn is_waited(&self, id: &RequestId) -> bool {
        self.map.contains_key(id)
    }

    /// Whether nobody is registered (every waiter dropped its entry).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Wakes callers held here when another replica sharing the store finishes
/// their requests (Postgres), until `shutdown`.
pub async fn follow_replicas(deferral: Deferral, shutdown: CancellationToken) {
    let waiters = deferral.waiters.clone();
    let gauge = deferral.metrics.replicas_listening.clone();
    deferral
        .store
        .follow_finished(
            &shutdown,
            &move |on| gauge.set(i64::from(on)),
            &move |ids: &[RequestId]| waiters.wake(ids),
        )
        .await;
}

impl Waiter {
    /// A future that completes at the next wake. Create it (and `enable`
    /// it) before reading the store, then await it.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Two references remain when this is the last waiter: the map's and ours.
        self.map
            .remove_if(&self.id, |_, notify| Arc::strong_count(notify) <= 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wake_reaches_a_registered_waiter_and_entries_are_dropped() {
        let waiters = Waiters::default();
        let id = RequestId::generate();
        let waiter = waiters.register(&id);
        {
            let notified = waiter.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiters.wake(std::slice::from_ref(&id));
            notified.await;
        }
        drop(waiter);
        assert!(waiters.is_empty());
    }
}
