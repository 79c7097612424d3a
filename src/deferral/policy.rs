//! When is an open window due? A pure decision over its age, its members'
//! deadlines and the batching settings. Size limits (`max_requests`,
//! `max_bytes`) are enforced at intake, where a full window is sealed.

use std::time::Duration;

pub use crate::store::FlushReason;

/// What the policy needs to know about an open window.
#[derive(Clone, Copy, Debug)]
pub struct WindowAge {
    /// Milliseconds since its oldest request was accepted.
    pub age_ms: i64,
    /// Milliseconds until the earliest member deadline, if any.
    pub until_deadline_ms: Option<i64>,
}

/// Returns why the window must be flushed now, if it must.
///
/// Deadline pressure: a member's deadline minus `fallback_margin` minus the
/// batch turnaround we expect is at hand, so waiting longer would only
/// push that caller to realtime.
pub fn due(
    window: WindowAge,
    max_wait: Duration,
    fallback_margin: Duration,
    turnaround: Duration,
) -> Option<FlushReason> {
    if window.age_ms >= max_wait.as_millis() as i64 {
        return Some(FlushReason::MaxWait);
    }
    let slack = (fallback_margin + turnaround).as_millis() as i64;
    match window.until_deadline_ms {
        Some(left) if left <= slack => Some(FlushReason::Deadline),
        _ => None,
    }
}

/// When the flusher should look again if nothing wakes it sooner.
pub fn next_check(
    window: WindowAge,
    max_wait: Duration,
    fallback_margin: Duration,
    turnaround: Duration,
) -> Duration {
    let by_age = max_wait.as_millis() as i64 - window.age_ms;
    let by_deadline = window
        .until_deadline_ms
        .map(|left| left - (fallback_margin + turnaround).as_millis() as i64)
        .unwrap_or(i64::MAX);
    Duration::from_millis(by_age.min(by_deadline).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn flushes_window_when_max_wait_reached() {
        let young = WindowAge {
            age_ms: 999,
            until_deadline_ms: None,
        };
        let old = WindowAge {
            age_ms: 1_000,
            until_deadline_ms: None,
        };
        assert_eq!(due(young, S, S, S), None);
        assert_eq!(due(old, S, S, S), Some(FlushReason::MaxWait));
    }

    #[test]
    fn flushes_early_under_deadline_pressure() {
        let pressed = WindowAge {
            age_ms: 0,
            until_deadline_ms: Some(5_000),
        };
        let relaxed = WindowAge {
            age_ms: 0,
            until_deadline_ms: Some(60_000),
        };
        let wait = Duration::from_secs(300);
        assert_eq!(
            due(pressed, wait, 2 * S, 3 * S),
            Some(FlushReason::Deadline)
        );
        assert_eq!(due(relaxed, wait, 2 * S, 3 * S), None);
        assert_eq!(
            next_check(relaxed, wait, 2 * S, 3 * S),
            Duration::from_secs(55)
        );
    }
}
