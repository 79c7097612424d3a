//! Intake backpressure: ceilings on pending (queued or submitted) deferred
//! requests, all credentials together and each on its own, and on the
//! distinct windows (upstream, endpoint and model: each its own provider
//! job) one credential has unfinished. Past one, the call is refused with
//! 429 before anything is stored.
//!
//! The check is cheap: it reads no store on the hot path. It weighs a
//! snapshot of the store's pending counts (summed over unfinished windows,
//! which are few; refreshed by one caller at a time at most every
//! [`REFRESH`]) plus the requests this process admitted since. Admissions
//! are never missed, so the estimate errs high: requests answered since the
//! snapshot still count until the next one. Calls racing past the check at
//! the same moment can overshoot a ceiling by their number; it is a soft
//! limit. Several replicas on one Postgres each see the others' admissions
//! only at their next refresh, so a fleet can overshoot by what the other
//! replicas admit within one [`REFRESH`] (a later concern: a shared counter
//! row would make it exact at the price of a write per intake).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{Store, StoreError, WindowKey};

/// How stale the store snapshot may get.
pub const REFRESH: Duration = Duration::from_millis(500);

/// Which ceiling refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Client,
    ClientWindows,
}

impl Scope {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Client => "client",
            Self::ClientWindows => "client_windows",
        }
    }

    /// The config key of the ceiling (the error's `code`).
    pub fn key(self) -> &'static str {
        match self {
            Self::Global => "max_pending",
            Self::Client => "max_pending_per_client",
            Self::ClientWindows => "max_open_windows_per_client",
        }
    }
}

/// What makes a window apart from its credential: upstream, endpoint, model.
pub type Route = (String, String, String);

/// One credential's pending requests and the routes of its unfinished windows.
#[derive(Default)]
struct Client {
    pending: u64,
    routes: HashSet<Route>,
}

#[derive(Default)]
struct Tally {
    total: u64,
    by_credential: HashMap<String, Client>,
}

impl Tally {
    fn get(&self, credential: &str) -> u64 {
        self.by_credential.get(credential).map_or(0, |c| c.pending)
    }

    fn routes(&self, credential: &str) -> Option<&HashSet<Route>> {
        self.by_credential.get(credential).map(|c| &c.routes)
    }

    fn add(&mut self, credential: &str, n: u64, route: Route) {
        self.total += n;
        let client = self.by_credential.entry(credential.to_owned()).or_default();
        client.pending += n;
        client.routes.insert(route);
    }

    /// Takes one back; false if there was none. Its route stays (counted
    /// high until the next refresh).
    fn take(&mut self, credential: &str) -> bool {
        match self.by_credential.get_mut(credential) {
            Some(c) if c.pending > 0 => {
                c.pending -= 1;
                self.total = self.total.saturating_sub(1);
                true
            }
            _ => false,
        }
    }

    fn absorb(&mut self, other: Tally) {
        for (credential, client) in other.by_credential {
            self.total += client.pending;
            let mine = self.by_credential.entry(credential).or_default();
            mine.pending += client.pending;
            mine.routes.extend(client.routes);
        }
    }
}

#[derive(Default)]
struct State {
    /// The store's counts at the last refresh.
    base: Tally,
    /// Admissions made before a refresh in progress started (the store
    /// count it reads includes them); dropped when it lands.
    carried: Tally,
    /// Admissions since the last refresh started.
    since: Tally,
    taken_at: Option<Instant>,
}

pub struct IntakeGate {
    global: Option<u64>,
    per_client: Option<u64>,
    windows_per_client: Option<u64>,
    state: Mutex<State>,
    refreshing: AtomicBool,
}

/// A place held under the ceilings; give it back with
/// [`IntakeGate::release`] when nothing new was stored.
#[must_use]
pub struct Admission {
    credential: Option<String>,
}

impl IntakeGate {
    pub fn new(
        global: Option<u64>,
        per_client: Option<u64>,
        windows_per_client: Option<u64>,
    ) -> Self {
        Self {
            global,
            per_client,
            windows_per_client,
            state: Mutex::new(State::default()),
            refreshing: AtomicBool::new(false),
        }
    }

    fn enabled(&self) -> bool {
        self.global.is_some() || self.per_client.is_some() || self.windows_per_client.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a place for one more pending request of `credential` on
    /// `route`, or says which ceiling is reached.
    pub async fn admit(
        &self,
        store: &Store,
        credential: &str,
        route: Route,
    ) -> Result<Admission, GateError> {
        if !self.enabled() {
            return Ok(Admission { credential: None });
        }
        let stale = self
            .lock()
            .taken_at
            .map_or(true, |t| t.elapsed() >= REFRESH);
        if stale {
            self.refresh(store).await?;
        }
        let mut s = self.lock();
        let total = s.base.total + s.carried.total + s.since.total;
        if self.global.is_some_and(|max| total >= max) {
            return Err(GateError::Full(Scope::Global));
        }
        let mine = s.base.get(credential) + s.carried.get(credential) + s.since.get(credential);
        if self.per_client.is_some_and(|max| mine >= max) {
            return Err(GateError::Full(Scope::Client));
        }
        if let Some(max) = self.windows_per_client {
            let known: HashSet<&Route> = [&s.base, &s.carried, &s.since]
                .into_iter()
                .filter_map(|t| t.routes(credential))
                .flatten()
                .collect();
            if !known.contains(&route) && known.len() as u64 >= max {
                return Err(GateError::Full(Scope::ClientWindows));
            }
        }
        s.since.add(credential, 1, route);
        Ok(Admission {
            credential: Some(credential.to_owned()),
        })
    }

    /// The call stored a new request: its place stays taken (counted in the
    /// store from now on).
    pub fn keep(&self, _admission: Admission) {}

    /// Gives a place back (the call stored nothing new: it failed, or
    /// re-attached to a request already counted).
    pub fn release(&self, admission: Admission) {
        if let Some(credential) = admission.credential {
            let mut s = self.lock();
            if !s.since.take(&credential) {
                s.carried.take(&credential);
            }
        }
    }

    /// Re-reads the store's counts. One caller refreshes at a time; the
    /// others go on with the last snapshot (the very first one, with none
    /// yet, reads the store itself).
    async fn refresh(&self, store: &Store) -> Result<(), GateError> {
        let first = self.lock().taken_at.is_none();
        if !first && self.refreshing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        {
            let mut s = self.lock();
            let since = std::mem::take(&mut s.since);
            s.carried.absorb(since);
        }
        let counted = store.pending_by_credential().await;
        if !first {
            self.refreshing.store(false, Ordering::Release);
        }
        let counted = match counted {
            Ok(counted) => counted,
            // Without any snapshot there is nothing to weigh against.
            Err(err) if first => return Err(err.into()),
            Err(err) => {
                tracing::warn!(error = %err, "cannot refresh pending counts; using the last ones");
                return Ok(());
            }
        };
        let mut base = Tally::default();
        for pending in counted {
            // Counted per route: the projects of one model count once.
            let WindowKey {
                upstream,
                credential_hash,
                scope: _,
                endpoint,
                model,
            } = pending.key;
            base.add(&credential_hash, pending.count, (upstream, endpoint, model));
        }
        let mut s = self.lock();
        s.base = base;
        s.carried = Tally::default();
        s.taken_at = Some(Instant::now());
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("the {} ceiling is reached", .0.key())]
    Full(Scope),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_place_is_taken_back_once() {
        let mut t = Tally::default();
        t.add("a", 2, route("m"));
        assert!(t.take("a"));
        assert!(t.take("a"));
        assert!(!t.take("a"));
        assert_eq!(t.total, 0);
    }

    #[test]
    fn absorbing_adds_per_credential() {
        let mut a = Tally::default();
        a.add("x", 1, route("m"));
        let mut b = Tally::default();
        b.add("x", 2, route("n"));
        b.add("y", 3, route("m"));
        a.absorb(b);
        assert_eq!((a.get("x"), a.get("y"), a.total), (3, 3, 6));
        assert_eq!(a.routes("x").map(HashSet::len), Some(2));
    }

    fn route(model: &str) -> Route {
        (
            "up".to_owned(),
            "/v1/chat/completions".to_owned(),
            model.to_owned(),
        )
    }
}
