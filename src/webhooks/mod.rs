//! Webhooks: the signed POST of a finished request to its `Carpool-Callback`.
//!
//! Owns: signing ([`signing`], pure), what an answer means and when to
//! retry ([`schedule`], pure), the SSRF guard ([`target`]) and the outbox
//! worker ([`worker`]). Does not own the outbox itself: the store enqueues a
//! delivery in the very transaction that finishes a request (so a crash
//! cannot keep the result and lose its delivery) and the worker claims due
//! ones from there, so deliveries survive restarts and several replicas can
//! share the work.
//!
//! Lifecycle of a delivery: enqueued (request final) → claimed (attempt n,
//! leased) → delivered (2xx) | retried on the schedule (other status,
//! transport error, `Retry-After` honoured) | dead letter (410, target
//! refused, `max_attempts` reached) → replayed by an operator → pending.
//! Delivery is at least once: `webhook-id` is the same on every attempt and
//! replay, for the receiver to deduplicate.

pub mod schedule;
pub mod signing;
pub mod target;
pub mod worker;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

/// The webhook side of the app: cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

pub struct Inner {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Rings when a delivery may have been enqueued or replayed.
    pub wake: Arc<Notify>,
}

impl std::ops::Deref for Webhooks {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Webhooks {
    /// `wake` is rung by whatever stores results (the deferral's waiters).
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                metrics,
                wake,
            }),
        }
    }

    /// Tells the worker to look for due deliveries now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}
