//! When is an open window due, and when is a request's realtime fallback?
//! Pure decisions over ages, deadlines and the batching settings. Size
//! limits (`max_requests`, `max_bytes`) are enforced at intake, where a full
//! window is sealed.

use std::time::Duration;

pub use crate::store::FlushReason;

/// What the policy needs to know about an open window.
#[derive(Clone, Copy, Debug)]
pub struct WindowAge {
    /// Milliseconds since its oldest request was accepted.
    pub age_ms: i64,
    /// Milliseconds until the earliest realtime fallback of a member, if
    /// any member has a deadline.
    pub until_fallback_ms: Option<i64>,
}

/// How long a batch of this window's model is expected to take, and how
/// long after it finishes carpool notices (one poll).
#[derive(Clone, Copy, Debug)]
pub struct Turnaround {
    pub expected: Duration,
    pub poll_interval: Duration,
}

impl Turnaround {
    /// How far ahead of a fallback a window must be submitted for its
    /// result to be back in time.
    fn lead(self) -> i64 {
        millis(self.expected.saturating_add(self.poll_interval))
    }
}

/// The moment a request's realtime fallback is due: `margin` before its
/// deadline, but never more than half of the time between its acceptance
/// and the deadline, so a caller with a short timeout still gets most of
/// its wait for a batch and is answered before it gives up.
pub fn fallback_at(accepted_at: i64, deadline: i64, margin: Duration) -> i64 {
    let half = deadline.saturating_sub(accepted_at).max(0) / 2;
    deadline.saturating_sub(millis(margin).min(half))
}

/// The earliest fallback among a window's members, from the two minima the
/// store keeps (earliest deadline, earliest midpoint between acceptance and
/// deadline). Never later than the true earliest, and equal to it when one
/// member holds both minima: sealing can only come early, never late.
pub fn earliest_fallback(deadline: i64, midpoint: i64, margin: Duration) -> i64 {
    deadline.saturating_sub(millis(margin)).max(midpoint)
}

/// Whether a request whose fallback is `until_fallback_ms` away can still
/// be answered by a batch: a new batch needs the expected turnaround.
pub fn batch_in_time(until_fallback_ms: i64, turnaround: Duration) -> bool {
    until_fallback_ms >= millis(turnaround)
}

/// Returns why the window must be flushed now, if it must.
///
/// Deadline pressure: a window waits for company no longer than it leaves
/// its batch before the earliest member's fallback, and never past the
/// point where that batch needs all the rest (one expected turnaround and
/// a poll). A member already too late for any batch is not a reason to
/// seal: the deadline worker answers it realtime, out of the window.
pub fn due(window: WindowAge, max_wait: Duration, turnaround: Turnaround) -> Option<FlushReason> {
    if window.age_ms >= millis(max_wait) {
        return Some(FlushReason::MaxWait);
    }
    match window.until_fallback_ms {
        Some(left) if pressed(window.age_ms, left, turnaround) => Some(FlushReason::Deadline),
        _ => None,
    }
}

/// Deadline pressure on a window whose earliest fallback is `left` away:
/// it has waited for company as long as it would leave its batch, or its
/// batch needs all the time that is left. Never for a member too late for
/// any batch.
fn pressed(age_ms: i64, left: i64, turnaround: Turnaround) -> bool {
    (age_ms >= left || left <= turnaround.lead()) && batch_in_time(left, turnaround.expected)
}

/// When the flusher should look again if nothing wakes it sooner.
pub fn next_check(window: WindowAge, max_wait: Duration, turnaround: Turnaround) -> Duration {
    next_flush(window, max_wait, turnaround).1
}

/// Which time threshold will seal the window if no request fills it first
/// (`max_wait` or `deadline` pressure), and in how long: what the flusher
/// waits for, and what the operator's page shows.
pub fn next_flush(
    window: WindowAge,
    max_wait: Duration,
    turnaround: Turnaround,
) -> (FlushReason, Duration) {
    let by_age = millis(max_wait).saturating_sub(window.age_ms);
    // The fallback draws nearer as the window ages: they meet halfway.
    let by_deadline = window.until_fallback_ms.map_or(i64::MAX, |left| {
        let meet = left.saturating_sub(window.age_ms) / 2;
        meet.min(left.saturating_sub(turnaround.lead()))
    });
    let (reason, ms) = if by_deadline < by_age {
        (FlushReason::Deadline, by_deadline)
    } else {
        (FlushReason::MaxWait, by_age)
    };
    (reason, Duration::from_millis(ms.max(1) as u64))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn turnaround(expected: Duration, poll_interval: Duration) -> Turnaround {
        Turnaround {
            expected,
            poll_interval,
        }
    }

    #[test]
    fn flushes_window_when_max_wait_reached() {
        let young = WindowAge {
            age_ms: 999,
            until_fallback_ms: None,
        };
        let old = WindowAge {
            age_ms: 1_000,
            until_fallback_ms: None,
        };
        assert_eq!(due(young, S, turnaround(S, S)), None);
        assert_eq!(due(old, S, turnaround(S, S)), Some(FlushReason::MaxWait));
    }

    #[test]
    fn flushes_early_under_deadline_pressure() {
        let wait = Duration::from_secs(300);
        let t = turnaround(3 * S, 2 * S);
        let pressed = WindowAge {
            age_ms: 0,
            until_fallback_ms: Some(5_000),
        };
        let relaxed = WindowAge {
            age_ms: 0,
            until_fallback_ms: Some(60_000),
        };
        assert_eq!(due(pressed, wait, t), Some(FlushReason::Deadline));
        assert_eq!(due(relaxed, wait, t), None);
        // Young and relaxed: it seals when age and time left meet, at 30 s.
        assert_eq!(next_check(relaxed, wait, t), Duration::from_secs(30));
        let halfway = WindowAge {
            age_ms: 30_000,
            until_fallback_ms: Some(30_000),
        };
        assert_eq!(due(halfway, wait, t), Some(FlushReason::Deadline));
    }

    #[test]
    fn a_member_too_late_for_any_batch_does_not_seal_its_window() {
        let too_late = WindowAge {
            age_ms: 0,
            until_fallback_ms: Some(2_000),
        };
        let t = turnaround(3 * S, S);
        assert_eq!(due(too_late, Duration::from_secs(300), t), None);
    }

    #[test]
    fn the_margin_never_takes_more_than_half_the_wait() {
        // An SDK with a 60 s timeout and the default 5 min margin: the
        // fallback comes after 30 s, not before the call was even made.
        let accepted = 1_000_000;
        let deadline = accepted + 60_000;
        assert_eq!(
            fallback_at(accepted, deadline, Duration::from_secs(300)),
            accepted + 30_000
        );
        // A long deadline keeps the whole margin.
        let far = accepted + 3_600_000;
        assert_eq!(
            fallback_at(accepted, far, Duration::from_secs(300)),
            far - 300_000
        );
        // The window's lower bound agrees when one member holds both minima.
        assert_eq!(
            earliest_fallback(
                deadline,
                (accepted + deadline) / 2,
                Duration::from_secs(300)
            ),
            accepted + 30_000
        );
    }
}
