//! The batch turnaround carpool expects per upstream and model, learned
//! from the jobs it has seen finish: the 90th percentile of the last
//! [`SAMPLES`] completed jobs. Until a model has any, the configured
//! `expected_turnaround` stands in.
//!
//! Kept in memory: after a restart the first job of each model teaches it
//! again, and until then the configured value is used, which errs towards
//! batching (a late batch is answered realtime, counted as double-paid).

use std::collections::VecDeque;
use std::time::Duration;

use dashmap::DashMap;

/// Completed jobs remembered per upstream and model.
pub const SAMPLES: usize = 20;

#[derive(Default)]
pub struct Turnarounds {
    seen: DashMap<(String, String), VecDeque<Duration>>,
}

impl Turnarounds {
    /// Records how long a completed job of `model` on `upstream` took,
    /// from its creation to carpool seeing it done.
    pub fn record(&self, upstream: &str, model: &str, took: Duration) {
        let mut samples = self
            .seen
            .entry((upstream.to_owned(), model.to_owned()))
            .or_default();
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(took);
    }

    /// The turnaround to plan with: the learned 90th percentile, else
    /// `configured`.
    pub fn expected(&self, upstream: &str, model: &str, configured: Duration) -> Duration {
        let key = (upstream.to_owned(), model.to_owned());
        match self.seen.get(&key) {
            Some(samples) if !samples.is_empty() => p90(&samples),
            _ => configured,
        }
    }
}

/// The nearest-rank 90th percentile.
fn p90(samples: &VecDeque<Duration>) -> Duration {
    let mut sorted: Vec<Duration> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let rank = (sorted.len() * 9).div_ceil(10).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_until_seen_then_the_90th_percentile_of_recent_jobs() {
        let t = Turnarounds::default();
        let configured = Duration::from_secs(7);
        assert_eq!(t.expected("u", "m", configured), configured);
        for s in 1..=10 {
            t.record("u", "m", Duration::from_secs(s));
        }
        assert_eq!(t.expected("u", "m", configured), Duration::from_secs(9));
        assert_eq!(t.expected("u", "other", configured), configured);
        // Only the last SAMPLES count: a slow past is forgotten.
        for _ in 0..SAMPLES {
            t.record("u", "m", Duration::from_millis(500));
        }
        assert_eq!(t.expected("u", "m", configured), Duration::from_millis(500));
    }
}
