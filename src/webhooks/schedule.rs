//! What an attempt's answer means and when to try again (pure).

use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured; beyond it the schedule decides.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Each scheduled delay is moved by up to this fraction either way.
pub const JITTER: f64 = 0.2;

/// What one answer from the receiver means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Any 2xx.
    Delivered,
    /// 410: the receiver wants no more; stop at once.
    Gone,
    /// Anything else (3xx included: redirects are not followed).
    Retry,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        _ => Verdict::Retry,
    }
}

/// The delay before the attempt after `attempt` (1-based) failed:
/// `schedule[attempt - 1]` (the last entry repeats), moved by `jitter`
/// (in [-1, 1], scaled to ±[`JITTER`]), and never shorter than the
/// receiver's `Retry-After` (capped at [`MAX_RETRY_AFTER`]).
pub fn next_delay(
    schedule: &[Duration],
    attempt: u32,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
    let base = schedule
        .get(index)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let factor = 1.0 + JITTER * jitter.clamp(-1.0, 1.0);
    let jittered = base.mul_f64(factor);
    match retry_after {
        Some(wait) => jittered.max(wait.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [Duration; 3] = [
        Duration::from_secs(5),
        Duration::from_secs(30),
        Duration::from_secs(120),
    ];

    #[test]
    fn any_2xx_delivers_410_stops_and_the_rest_retry() {
        for s in [200, 201, 204, 299] {
            assert_eq!(verdict(s), Verdict::Delivered);
        }
        assert_eq!(verdict(410), Verdict::Gone);
        for s in [100, 301, 302, 307, 400, 404, 429, 500, 502, 503] {
            assert_eq!(verdict(s), Verdict::Retry, "{s}");
        }
    }

    #[test]
    fn follows_the_schedule_and_repeats_its_last_delay() {
        assert_eq!(next_delay(&S, 1, 0.0, None), Duration::from_secs(5));
        assert_eq!(next_delay(&S, 2, 0.0, None), Duration::from_secs(30));
        assert_eq!(next_delay(&S, 3, 0.0, None), Duration::from_secs(120));
        assert_eq!(next_delay(&S, 9, 0.0, None), Duration::from_secs(120));
        assert_eq!(next_delay(&S, 0, 0.0, None), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(next_delay(&S, 2, 1.0, None), Duration::from_secs(36));
        assert_eq!(next_delay(&S, 2, -1.0, None), Duration::from_secs(24));
        assert_eq!(next_delay(&S, 2, 7.0, None), Duration::from_secs(36));
    }

    #[test]
    fn retry_after_can_only_lengthen_the_wait_up_to_a_day() {
        let ra = Some(Duration::from_secs(600));
        assert_eq!(next_delay(&S, 1, 0.0, ra), Duration::from_secs(600));
        assert_eq!(
            next_delay(&S, 1, 0.0, Some(Duration::from_secs(1))),
            Duration::from_secs(5)
        );
        let huge = Some(Duration::from_secs(10 * 86400));
        assert_eq!(next_delay(&S, 1, 0.0, huge), MAX_RETRY_AFTER);
    }

    #[test]
    fn reads_retry_after_as_seconds_or_http_date() {
        // Wed, 21 Oct 2015 07:28:00 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
