//! Enqueued-token quotas (SPEC section 3), waited out instead of failed.
//!
//! Providers cap the input tokens one key may have in unfinished batches of
//! one model, and refuse a create past it (OpenAI: the batch is `failed`
//! with `errors.data[].code = "token_limit_exceeded"`). Two mechanisms keep
//! such a refusal from ever reaching a caller:
//!
//! - `max_enqueued_tokens` caps, per upstream, credential and model, the
//!   estimated input tokens (body bytes / 4) of the windows on their way to
//!   the provider or at it (uploaded, creating, submitted). Sealed windows
//!   are admitted oldest first while they fit; the first one that does not,
//!   and every later one of its key, stays sealed (no error, no backoff)
//!   until enough finishes. A window larger than the cap on its own goes
//!   when nothing else of its key is in flight, so it is never stuck.
//! - A job the provider refuses for its own limit goes back to sealed: not
//!   a batch failure, no resubmission counted. It is held, with the windows
//!   of its key behind it, until a batch of that key in flight at the
//!   refusal finishes, or a backoff passes when none was.
//!
//! Holds live in memory: after a restart a refused window is gated by the
//! cap alone, which costs at most one more refusal. Replicas sharing a
//! store each apply the cap to the same store listing, so they agree on the
//! order; two of them may still admit windows in the same instant, and the
//! provider's refusal then catches the excess.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::engine::{BatchUpstream, Deferral};
use crate::config::AuthMode;
use crate::model::WindowId;
use crate::providers::{JobPhase, JobView};
use crate::store::{StoreError, WindowRecord, WindowState};

/// The provider's code for a create past its enqueued-token limit.
const TOKEN_LIMIT_CODE: &str = "token_limit_exceeded";

/// Longest wait between two tries of a refused window when nothing of its
/// key was in flight to finish first.
const MAX_HOLD: Duration = Duration::from_secs(600);

/// A window the provider refused for quota: when to try it again anyway,
/// how often it was refused, and the batches of its key in flight at the
/// last refusal (the first of them to finish releases it).
#[derive(Debug)]
pub struct Hold {
    until: Instant,
    refusals: u32,
    waiting_on: HashSet<WindowId>,
}

/// Estimated input tokens of `bytes` of request bodies (until the provider
/// reports usage, four bytes make a token).
pub fn estimated_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// Whether a terminal job is the provider's refusal for its enqueued-token
/// limit: failed, nothing done, and the limit's code among its errors.
pub fn refused_for_quota(job: &JobView) -> bool {
    job.phase == JobPhase::Failed
        && job.succeeded == 0
        && job.errors.iter().any(|e| e.contains(TOKEN_LIMIT_CODE))
}

/// What one quota is counted over: the upstream, the credential its batch
/// calls use (carpool's own key for a managed upstream, so one per
/// upstream; the caller's for a passthrough one) and the model.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct QuotaKey<'a> {
    upstream: &'a str,
    credential: Option<&'a str>,
    model: &'a str,
}

fn quota_key<'a>(deferral: &Deferral, window: &'a WindowRecord) -> QuotaKey<'a> {
    let passthrough = deferral
        .upstream(&window.key.upstream)
        .is_some_and(|u| u.config.auth == AuthMode::Passthrough);
    QuotaKey {
        upstream: &window.key.upstream,
        credential: passthrough.then_some(window.key.credential_hash.as_str()),
        model: &window.key.model,
    }
}

fn cap_for(deferral: &Deferral, key: QuotaKey<'_>) -> Option<u64> {
    let upstream = deferral.upstream(key.upstream)?;
    deferral
        .config
        .batching
        .policy_for(key.model, upstream.config.dialect)
        .max_enqueued_tokens
}

/// Whether any quota can hold a window back now (else nothing is listed).
fn any_gate(deferral: &Deferral) -> bool {
    !deferral.quota_holds.is_empty()
        || deferral
            .config
            .batching
            .defaults
            .max_enqueued_tokens
            .is_some()
        || deferral
            .config
            .batching
            .models
            .iter()
            .any(|m| m.max_enqueued_tokens.is_some())
}

/// The states whose windows count against a quota or wait for one.
pub const QUEUED: [WindowState; 4] = [
    WindowState::Sealed,
    WindowState::Uploaded,
    WindowState::Creating,
    WindowState::Submitted,
];

/// The sealed windows that must wait for quota now, from a fresh listing
/// of the store (for a scrape); sets the gauge as [`waiting_among`] does.
pub async fn waiting(deferral: &Deferral) -> Result<HashSet<WindowId>, StoreError> {
    if !any_gate(deferral) {
        deferral.metrics.windows_waiting_for_quota.reset();
        return Ok(HashSet::new());
    }
    let windows = deferral.store.windows_in(&QUEUED).await?;
    Ok(waiting_among(deferral, &windows))
}

/// The sealed windows among `windows` (one listing of the [`QUEUED`]
/// states, so the decision and the caller's work see the same snapshot)
/// that must wait for quota now. Also sets
/// `carpool_windows_waiting_for_quota` from that answer, so the gauge is
/// exact at each flusher pass and each scrape.
pub fn waiting_among(deferral: &Deferral, windows: &[WindowRecord]) -> HashSet<WindowId> {
    if !any_gate(deferral) {
        deferral.metrics.windows_waiting_for_quota.reset();
        return HashSet::new();
    }
    // A held window that finished some other way (its members answered
    // realtime, failed for good) needs its hold no more.
    let listed: HashSet<&WindowId> = windows.iter().map(|w| &w.id).collect();
    deferral.quota_holds.retain(|id, _| listed.contains(id));
    let waiting = plan(deferral, windows, Instant::now());
    observe(deferral, windows, &waiting);
    waiting
}

/// Walks each quota's sealed windows oldest first (the store lists them
/// so), admitting while the estimate fits under the cap and no hold stops
/// the line; returns the rest.
fn plan(deferral: &Deferral, windows: &[WindowRecord], now: Instant) -> HashSet<WindowId> {
    let mut by_key: HashMap<QuotaKey<'_>, Vec<&WindowRecord>> = HashMap::new();
    for window in windows {
        by_key
            .entry(quota_key(deferral, window))
            .or_default()
            .push(window);
    }
    let mut waiting = HashSet::new();
    for (key, group) in by_key {
        let cap = cap_for(deferral, key);
        let (sealed, in_flight): (Vec<&WindowRecord>, Vec<&WindowRecord>) = group
            .into_iter()
            .partition(|w| w.state == WindowState::Sealed);
        let flying: HashSet<&WindowId> = in_flight.iter().map(|w| &w.id).collect();
        let mut enqueued: u64 = in_flight.iter().map(|w| estimated_tokens(w.bytes)).sum();
        let mut blocked = false;
        for window in sealed {
            let tokens = estimated_tokens(window.bytes);
            let over = cap.is_some_and(|cap| enqueued > 0 && enqueued + tokens > cap);
            blocked = blocked || over || held(deferral, &window.id, &flying, now);
            if blocked {
                waiting.insert(window.id.clone());
            } else {
                enqueued += tokens;
            }
        }
    }
    waiting
}

/// Whether a refused window's hold still stands: its backoff has not
/// passed and every batch it waits on is still in flight.
fn held(deferral: &Deferral, id: &WindowId, in_flight: &HashSet<&WindowId>, now: Instant) -> bool {
    deferral.quota_holds.get(id).is_some_and(|hold| {
        now < hold.until && {
            // With nothing to wait on, only the backoff releases it.
            hold.waiting_on.is_empty() || hold.waiting_on.iter().all(|w| in_flight.contains(w))
        }
    })
}

fn observe(deferral: &Deferral, windows: &[WindowRecord], waiting: &HashSet<WindowId>) {
    let gauge = &deferral.metrics.windows_waiting_for_quota;
    let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
    for window in windows.iter().filter(|w| waiting.contains(&w.id)) {
        let model = deferral.metrics.model_label(&window.key.model);
        *counts.entry((&window.key.upstream, model)).or_default() += 1;
    }
    gauge.reset();
    for ((upstream, model), count) in counts {
        gauge.with_label_values(&[upstream, model]).set(count);
    }
}

/// The provider refused `window`'s job (at create, or as a failed job) for
/// its enqueued-token limit: back to sealed, its file deleted, held until a
/// batch of its key in flight now finishes or a backoff passes.
pub async fn back_to_waiting(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
) -> Result<(), StoreError> {
    if !deferral.store.return_to_sealed(&window.id).await? {
        return Ok(());
    }
    if let Some(file) = window.file_id.as_deref() {
        if let Err(err) = upstream.client.delete_file(key, file).await {
            tracing::warn!(window = %window.id, file, error = %err, "could not delete a refused window's file");
        }
    }
    let states = [
        WindowState::Uploaded,
        WindowState::Creating,
        WindowState::Submitted,
    ];
    let mine = quota_key(deferral, window);
    let waiting_on: HashSet<WindowId> = deferral
        .store
        .windows_in(&states)
        .await?
        .iter()
        .filter(|w| w.id != window.id && quota_key(deferral, w) == mine)
        .map(|w| w.id.clone())
        .collect();
    let refusals = deferral
        .quota_holds
        .get(&window.id)
        .map_or(0, |h| h.refusals)
        + 1;
    let backoff = backoff(deferral.config.batching.poll_interval, refusals);
    tracing::info!(
        window = %window.id, refusals, in_flight = waiting_on.len(), backoff_ms = backoff.as_millis() as u64,
        "the provider refused the batch for its enqueued-token limit; the window waits for quota"
    );
    deferral.quota_holds.insert(
        window.id.clone(),
        Hold {
            until: Instant::now() + backoff,
            refusals,
            waiting_on,
        },
    );
    deferral.flush_wake.notify_one();
    Ok(())
}

/// A terminal job of `window` at the poller: a quota refusal sends the
/// window back to waiting (true: nothing else to do with the job); any
/// other end forgets the window's hold (false).
pub async fn on_terminal_job(
    deferral: &Deferral,
    upstream: &BatchUpstream,
    key: &str,
    window: &WindowRecord,
    job: &JobView,
) -> Result<bool, StoreError> {
    if refused_for_quota(job) {
        back_to_waiting(deferral, upstream, key, window).await?;
        return Ok(true);
    }
    deferral.quota_holds.remove(&window.id);
    Ok(false)
}

/// The poll interval (at least 1 s), doubled for each refusal after the
/// first, up to [`MAX_HOLD`].
fn backoff(poll_interval: Duration, refusals: u32) -> Duration {
    let base = poll_interval.max(Duration::from_secs(1));
    base.saturating_mul(1 << refusals.saturating_sub(1).min(10))
        .min(MAX_HOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_four_bytes_a_token_rounding_up() {
        assert_eq!(estimated_tokens(0), 0);
        assert_eq!(estimated_tokens(4), 1);
        assert_eq!(estimated_tokens(5), 2);
    }

    #[test]
    fn backoff_doubles_from_the_poll_interval_up_to_the_cap() {
        let poll = Duration::from_secs(2);
        assert_eq!(backoff(poll, 1), Duration::from_secs(2));
        assert_eq!(backoff(poll, 3), Duration::from_secs(8));
        assert_eq!(backoff(poll, 40), MAX_HOLD);
        assert_eq!(
            backoff(Duration::from_millis(50), 1),
            Duration::from_secs(1)
        );
    }
}
