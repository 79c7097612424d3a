//! The deferred path's shared state: the store, one batch client per
//! upstream, the waiters, and the wake-ups of the workers. Cheap to clone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::{DashMap, DashSet};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use super::backpressure::IntakeGate;
use super::turnaround::Turnarounds;
use crate::config::{AuthMode, Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::model::{RequestId, WindowId};
use crate::providers::{BatchClient, CallLimits, RetryPolicy};
use crate::proxy::Forwarder;
use crate::resolution::waiters::Waiters;
use crate::store::{Store, WindowRecord};

/// One upstream as the batch workers see it.
pub struct BatchUpstream {
    pub config: UpstreamConfig,
    pub client: BatchClient,
}

impl BatchUpstream {
    /// The key a window's batch calls use: carpool's own for managed
    /// upstreams, the window owner's for passthrough ones.
    pub fn key_for<'a>(&'a self, window: &'a WindowRecord) -> Option<&'a str> {
        match self.config.auth {
            AuthMode::Managed => self.config.api_key.as_ref().map(|k| k.expose()),
            AuthMode::Passthrough => window.upstream_key.as_deref(),
        }
    }
}

pub struct Inner {
    pub config: Arc<Config>,
    pub store: Store,
    pub upstreams: HashMap<String, BatchUpstream>,
    pub waiters: Waiters,
    pub metrics: Arc<Metrics>,
    /// Rings when a window was sealed or may be due.
    pub flush_wake: Notify,
    /// Rings when a job was created, so it is polled without delay.
    pub poll_wake: Notify,
    /// Windows this process is working on right now (submitting or reconciling).
    pub busy: DashSet<WindowId>,
    /// This process among the replicas sharing the store: the owner of the
    /// window leases it takes (random, new at every start).
    pub instance: String,
    /// Windows whose last submission failed: attempts so far and when to
    /// try again. Pacing only; losing it on restart costs one early retry.
    pub backoff: DashMap<WindowId, (u32, tokio::time::Instant)>,
    /// Sends realtime fallbacks (the synchronous endpoint).
    pub forwarder: Forwarder,
    /// Rings when a request with a deadline was accepted.
    pub deadline_wake: Notify,
    /// Requests this process is answering by a realtime call right now, so
    /// the deadline worker and a failed job never both call for one.
    pub fallbacks: DashSet<RequestId>,
    /// Intake ceilings (`max_pending`, `max_pending_per_client`,
    /// `max_open_windows_per_client`).
    pub gate: IntakeGate,
    /// Windows the provider refused for its enqueued-token limit, held
    /// back until quota frees ([`super::quota`]).
    pub quota_holds: DashMap<WindowId, super::quota::Hold>,
    /// Batch turnarounds seen per upstream and model.
    pub turnarounds: Turnarounds,
    /// The app's task tracker (shared with `AppState::tasks`).
    pub tasks: TaskTracker,
}

#[derive(Clone)]
pub struct Deferral {
    inner: Arc<Inner>,
}

impl std::ops::Deref for Deferral {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Deferral {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        forwarder: Forwarder,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Self {
        let http = forwarder.client().clone();
        let retry = RetryPolicy {
            observer: Some(metrics.upstream_retry_observer()),
            ..RetryPolicy::default()
        };
        let limits = CallLimits {
            call: config.batching.call_timeout,
            idle: config.batching.idle_timeout,
        };
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                let client = BatchClient::new(
                    http.clone(),
                    u.base_url.as_str(),
                    u.dialect,
                    retry.clone(),
                    limits,
                )
                .with_completion_window(&u.completion_window);
                (
                    u.name.clone(),
                    BatchUpstream {
                        config: u.clone(),
                        client,
                    },
                )
            })
            .collect();
        let gate = IntakeGate::new(
            config.batching.max_pending,
            config.batching.max_pending_per_client,
            Some(config.batching.max_open_windows_per_client),
        );
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                upstreams,
                waiters: Waiters::default(),
                metrics,
                flush_wake: Notify::new(),
                poll_wake: Notify::new(),
                busy: DashSet::new(),
                instance: new_instance_id(),
                backoff: DashMap::new(),
                forwarder,
                deadline_wake: Notify::new(),
                fallbacks: DashSet::new(),
                gate,
                quota_holds: DashMap::new(),
                turnarounds: Turnarounds::default(),
                tasks,
            }),
        }
    }

    /// Spawns a unit of work (a window's submission or reconciliation, a
    /// held stream) on the app's tracker, so shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    pub fn upstream(&self, name: &str) -> Option<&BatchUpstream> {
        self.upstreams.get(name)
    }

    /// Whether a window's last failure asks us to wait before retrying.
    pub fn backing_off(&self, id: &WindowId) -> bool {
        self.backoff
            .get(id)
            .is_some_and(|entry| tokio::time::Instant::now() < entry.1)
    }

    /// Records a failed attempt on a window: 1 s, 2 s, 4 s … up to 60 s.
    pub fn failed_attempt(&self, id: &WindowId) {
        let mut entry = self
            .backoff
            .entry(id.clone())
            .or_insert((0, tokio::time::Instant::now()));
        entry.0 += 1;
        let wait = Duration::from_secs(1 << entry.0.min(6)).min(Duration::from_secs(60));
        entry.1 = tokio::time::Instant::now() + wait;
    }

    pub fn succeeded_attempt(&self, id: &WindowId) {
        self.backoff.remove(id);
    }
}

/// Marks a request as being answered realtime for as long as it lives.
pub struct FallbackGuard {
    deferral: Deferral,
    id: RequestId,
}

impl FallbackGuard {
    pub fn try_take(deferral: &Deferral, id: &RequestId) -> Option<Self> {
        deferral.fallbacks.insert(id.clone()).then(|| Self {
            deferral: deferral.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for FallbackGuard {
    fn drop(&mut self) {
        self.deferral.fallbacks.remove(&self.id);
    }
}

/// Marks a window busy for as long as the guard lives.
pub struct BusyGuard {
    deferral: Deferral,
    id: WindowId,
}

impl BusyGuard {
    pub fn try_take(deferral: &Deferral, id: &WindowId) -> Option<Self> {
        deferral.busy.insert(id.clone()).then(|| Self {
            deferral: deferral.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.deferral.busy.remove(&self.id);
    }
}

/// `cpi_` and 64 random bits in hex.
fn new_instance_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    crate::model::prefixed_hex("cpi_", &bytes)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}
