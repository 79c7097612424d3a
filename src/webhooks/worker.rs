//! The outbox worker: claims due deliveries from the store, runs up to
//! [`CONCURRENCY`] attempts at once, and records each outcome. Woken when a
//! result is stored or a dead letter replayed, and by a timer for the next
//! due attempt (at most [`IDLE`] apart, so deliveries another replica
//! enqueued or a lease that ran out are picked up too).
//!
//! Fairness: at most [`PER_HOST`] attempts to one target host and port are
//! in flight at once (per process), so one slow or dead receiver can hold
//! only that many slots. A claimed delivery whose host is at its cap is
//! given back uncounted, due again a little later ([`BUSY_RETRY`], or the
//! attempt timeout for a host whose last attempt timed out), and the
//! deliveries behind it are claimed in its place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use super::schedule::{next_delay, parse_retry_after, verdict, Verdict};
use super::target::{vet, TargetError, Vetted};
use super::{signing, Webhooks};
use crate::deferral::engine::{ms, now_ms};
use crate::store::DeliveryRecord;

/// Attempts in flight at once.
pub const CONCURRENCY: usize = 16;

/// Attempts to one target host (and port) in flight at once.
pub const PER_HOST: usize = 4;

/// How much later a delivery given back for a busy host is due again.
pub const BUSY_RETRY: Duration = Duration::from_millis(500);

/// Longest sleep between looks at the outbox.
pub const IDLE: Duration = Duration::from_secs(5);

/// Added to an attempt's own bounds to make its lease.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// How one attempt ended.
#[derive(Debug)]
enum Outcome {
    Delivered {
        status: u16,
    },
    /// Worth another attempt on the schedule.
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
        result: &'static str,
    },
    /// Never worth another attempt: a dead letter at once.
    Terminal {
        status: Option<u16>,
        reason: String,
        outcome: &'static str,
    },
}

/// Runs until `token` is cancelled; attempts in flight then finish (each
/// bounded by `webhooks.timeout`).
pub async fn run(hooks: Webhooks, token: CancellationToken) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let hosts = Hosts::default();
    let in_flight = TaskTracker::new();
    let finished = Arc::new(Notify::new());
    loop {
        let free = slots.available_permits();
        let mut wait = IDLE;
        if free > 0 {
            let now = now_ms();
            let lease = now + ms(hooks.config.webhooks.timeout * 2 + LEASE_MARGIN);
            let limit = u32::try_from(free).unwrap_or(u32::MAX);
            match hooks.store.claim_deliveries(now, lease, limit).await {
                Ok(claimed) => {
                    for delivery in claimed {
                        let host = host_of(&delivery.url);
                        let permit = match slots.clone().try_acquire_owned() {
                            Ok(permit) => permit,
                            Err(_) => {
                                give_back(&hooks, &delivery, now, Duration::ZERO).await;
                                continue;
                            }
                        };
                        let Some(seat) = hosts.admit(&host) else {
                            let later = hosts.busy_retry(&host, hooks.config.webhooks.timeout);
                            give_back(&hooks, &delivery, now, later).await;
                            continue;
                        };
                        in_flight.spawn(attempt(
                            hooks.clone(),
                            delivery,
                            (permit, seat),
                            finished.clone(),
                        ));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot claim webhook deliveries; trying again shortly");
                    wait = Duration::from_secs(1);
                }
            }
        }
        match hooks.store.outbox_pending().await {
            Ok((pending, due)) => {
                hooks
                    .metrics
                    .webhook_outbox_pending
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
                if let Some(due) = due {
                    let until = u64::try_from(due - now_ms()).unwrap_or(0);
                    wait = wait.min(Duration::from_millis(until.max(5)));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the webhook outbox"),
        }
        if slots.available_permits() == 0 {
            // Every slot is busy: the next look is when one frees.
            wait = IDLE;
        }
        tokio::select! {
            () = token.cancelled() => break,
            () = hooks.wake.notified() => {}
            () = finished.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    in_flight.close();
    in_flight.wait().await;
}

/// The target host and port of a callback URL: what [`PER_HOST`] counts.
fn host_of(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            super::target::host_key(&u).unwrap_or_default(),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => String::new(),
    }
}

/// Gives a claimed delivery back without attempting it, due `later`.
async fn give_back(hooks: &Webhooks, d: &DeliveryRecord, now: i64, later: Duration) {
    if let Err(error) = hooks
        .store
        .delivery_release(&d.id, d.attempts, now + ms(later))
        .await
    {
        // Its lease runs out and it is claimed again (one attempt counted).
        tracing::warn!(delivery = %d.id, %error, "cannot give back a webhook claim");
    }
}

/// Attempts in flight per target host, and whether its last one timed out.
#[derive(Clone, Default)]
struct Hosts(Arc<Mutex<HashMap<String, HostState>>>);

#[derive(Default)]
struct HostState {
    in_flight: usize,
    timed_out: bool,
}

/// One attempt's place in its host's count; gives it back when dropped.
struct Seat {
    hosts: Hosts,
    host: String,
    timed_out: bool,
}

impl Hosts {
    fn admit(&self, host: &str) -> Option<Seat> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = map.entry(host.to_owned()).or_default();
        if state.in_flight >= PER_HOST {
            return None;
        }
        state.in_flight += 1;
        Some(Seat {
            hosts: self.clone(),
            host: host.to_owned(),
            timed_out: false,
        })
    }

    /// When a delivery given back for `host` is due again: soon, unless
    /// the host's last attempt timed out (then no seat frees sooner than
    /// an attempt's timeout, most likely).
    fn busy_retry(&self, host: &str, timeout: Duration) -> Duration {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(host) {
            Some(s) if s.timed_out => timeout.max(BUSY_RETRY),
            _ => BUSY_RETRY,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut map = self
            .hosts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(state) = map.get_mut(&self.host) {
            state.in_flight = state.in_flight.saturating_sub(1);
            state.timed_out = self.timed_out;
            if state.in_flight == 0 && !state.timed_out {
                map.remove(&self.host);
            }
        }
    }
}

async fn attempt(
    hooks: Webhooks,
    delivery: DeliveryRecord,
    (_slot, mut seat): (OwnedSemaphorePermit, Seat),
    finished: Arc<Notify>,
) {
    let outcome = deliver_once(&hooks, &delivery).await;
    seat.timed_out = matches!(
        outcome,
        Outcome::Failed {
            result: "timeout",
            ..
        }
    );
    drop(seat);
    if let Err(error) = record(&hooks, &delivery, outcome).await {
        // The lease runs out and the attempt is made again: at least once.
        tracing::error!(delivery = %delivery.id, %error, "cannot record a webhook attempt");
    }
    finished.notify_one();
}

async fn record(
    hooks: &Webhooks,
    d: &DeliveryRecord,
    outcome: Outcome,
) -> Result<(), crate::store::StoreError> {
    let m = &hooks.metrics;
    let now = now_ms();
    match outcome {
        Outcome::Delivered { status } => {
            m.webhook_attempts.with_label_values(&["success"]).inc();
            if hooks.store.delivery_succeeded(&d.id, status, now).await? {
                m.webhook_deliveries.with_label_values(&["delivered"]).inc();
                m.webhook_delivery_latency
                    .observe((now - d.created_at).max(0) as f64 / 1000.0);
                tracing::debug!(delivery = %d.id, request = %d.request_id, attempt = d.attempts, status, "webhook delivered");
            }
        }
        Outcome::Terminal {
            status,
            reason,
            outcome,
        } => {
            m.webhook_attempts.with_label_values(&[outcome]).inc();
            if hooks
                .store
                .delivery_dead(&d.id, d.attempts, status, &reason, now)
                .await?
            {
                m.webhook_deliveries.with_label_values(&[outcome]).inc();
                tracing::warn!(delivery = %d.id, request = %d.request_id, attempt = d.attempts, %reason, "webhook dead-lettered");
            }
        }
        Outcome::Failed {
            status,
            error,
            retry_after,
            result,
        } => {
            m.webhook_attempts.with_label_values(&[result]).inc();
            if d.attempts >= hooks.config.webhooks.max_attempts {
                let reason = format!("gave up after {} attempts: {error}", d.attempts);
                if hooks
                    .store
                    .delivery_dead(&d.id, d.attempts, status, &reason, now)
                    .await?
                {
                    m.webhook_deliveries.with_label_values(&["exhausted"]).inc();
                    tracing::warn!(delivery = %d.id, request = %d.request_id, %reason, "webhook dead-lettered");
                }
            } else {
                let jitter = rand::thread_rng().gen_range(-1.0..=1.0);
                let delay = next_delay(
                    &hooks.config.webhooks.schedule,
                    d.attempts,
                    jitter,
                    retry_after,
                );
                hooks
                    .store
                    .delivery_retry(&d.id, d.attempts, now + ms(delay), status, &error)
                    .await?;
                tracing::info!(delivery = %d.id, attempt = d.attempts, %error, retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)), "webhook attempt failed; will retry");
            }
        }
    }
    Ok(())
}

fn terminal(reason: impl Into<String>, outcome: &'static str) -> Outcome {
    Outcome::Terminal {
        status: None,
        reason: reason.into(),
        outcome,
    }
}

/// One attempt: render, vet the target, POST the signed body.
async fn deliver_once(hooks: &Webhooks, d: &DeliveryRecord) -> Outcome {
    let config = &hooks.config.webhooks;
    if config.secrets.is_empty() {
        return terminal("no webhooks.secret is configured to sign with", "dropped");
    }
    let record = match hooks.store.request_by_id(&d.request_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return terminal("the request is no longer stored", "dropped"),
        Err(e) => {
            return Outcome::Failed {
                status: None,
                error: format!("store: {e}"),
                retry_after: None,
                result: "transport_error",
            }
        }
    };
    let Ok(url) = Url::parse(&d.url) else {
        return terminal("the callback URL no longer parses", "refused");
    };
    let vetted = match tokio::time::timeout(config.timeout, vet(&url, &config.allow_hosts)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.is_refusal() => return terminal(e.to_string(), "refused"),
        Ok(Err(e)) => return failed_transport(e.to_string(), "transport_error"),
        Err(_) => {
            let e = TargetError::Resolve {
                host: url.host_str().unwrap_or_default().to_owned(),
                reason: "lookup timed out".to_owned(),
            };
            return failed_transport(e.to_string(), "timeout");
        }
    };
    let client = match client_for(&vetted, config.timeout) {
        Ok(c) => c,
        Err(e) => {
            return failed_transport(format!("client: {}", e.without_url()), "transport_error")
        }
    };
    let body = signing::body(
        &record,
        &d.event,
        record.completed_at.unwrap_or(d.created_at),
    );
    let timestamp = now_ms().div_euclid(1000);
    let signature = signing::signature_header(&config.secrets, d.id.as_str(), timestamp, &body);
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", d.id.as_str())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return failed_transport(transport_reason(e), "timeout"),
        Err(e) => return failed_transport(transport_reason(e), "transport_error"),
    };
    let status = response.status().as_u16();
    match verdict(status) {
        Verdict::Delivered => Outcome::Delivered { status },
        Verdict::Gone => Outcome::Terminal {
            status: Some(status),
            reason: "the receiver answered 410 Gone".to_owned(),
            outcome: "gone",
        },
        Verdict::Retry => Outcome::Failed {
            status: Some(status),
            error: format!("the receiver answered {status}"),
            retry_after: response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            result: "http_error",
        },
    }
}

fn failed_transport(error: String, result: &'static str) -> Outcome {
    Outcome::Failed {
        status: None,
        error,
        retry_after: None,
        result,
    }
}

/// The error chain of a transport failure, without the URL (its query may
/// carry the receiver's token): this goes to logs and dead letters.
fn transport_reason(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut reason = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

/// A client for one attempt: no redirects, no proxy (it would resolve the
/// name itself), the attempt's timeout, and the host pinned to the vetted
/// addresses so no second lookup can rebind it.
fn client_for(vetted: &Vetted, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("carpool-webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some((host, addrs)) = &vetted.pin {
        builder = builder.resolve_to_addrs(host, addrs);
    }
    builder.build()
}
