//! Is this call deferred, and how is it answered? A pure decision over the
//! request's headers, its path and the configured rules (SPEC section 1).
//! An explicit header wins over a path prefix, which wins over a rule.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// How a deferred call is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Hold the connection and answer like the synchronous call.
    Wait,
    /// 202 and a handle at once (`Carpool-Mode: async`, `Prefer: respond-async`).
    Async { prefer: bool },
    /// Hold up to the given time, then 202 and a handle (`Prefer: respond-async, wait=N`).
    AsyncAfter(Duration),
}

/// The outcome of reading a call's opt-ins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not deferred: pass straight through.
    Pass,
    Defer(Answer),
}

/// A configured default for calls that carry no opt-in header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMode {
    Wait,
    Async,
    Now,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptInError {
    #[error("Carpool-Mode must be wait, async or now, not {0:?}")]
    UnknownMode(String),
    #[error("Carpool-Deadline must be seconds from now or an RFC 3339 time, not {0:?}")]
    BadDeadline(String),
    #[error("Carpool-Deadline {0:?} is in the past")]
    DeadlineInPast(String),
    #[error("header {0} is not valid text")]
    NotText(&'static str),
}

/// The longest `Prefer: wait=N` honoured; a longer one is clamped to it
/// (RFC 7240 lets the server apply less than asked, and says so in
/// `Preference-Applied`).
pub const MAX_PREFER_WAIT: Duration = Duration::from_secs(3600);

/// The longest `x-stainless-read-timeout` taken as a deadline. A declared
/// timeout longer than this (a provider batch window is 24 h) is ignored:
/// the call then waits like one without a declared timeout.
pub const MAX_READ_TIMEOUT_SECS: f64 = 30.0 * 24.0 * 3600.0;

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, OptInError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| OptInError::NotText(name)),
    }
}

/// Decides whether and how a call is deferred.
///
/// `prefixed` is true when the call came in under the defer path prefix;
/// `rule` is the mode of the first matching `[[rules]]` entry, if any.
pub fn decide(
    headers: &HeaderMap,
    prefixed: bool,
    rule: Option<RuleMode>,
) -> Result<Decision, OptInError> {
    if let Some(mode) = header(headers, "carpool-mode")? {
        return match mode.to_ascii_lowercase().as_str() {
            "wait" => Ok(Decision::Defer(Answer::Wait)),
            "async" => Ok(Decision::Defer(Answer::Async { prefer: false })),
            "now" => Ok(Decision::Pass),
            _ => Err(OptInError::UnknownMode(mode.to_owned())),
        };
    }
    if let Some(answer) = prefer(headers)? {
        return Ok(Decision::Defer(answer));
    }
    if prefixed {
        return Ok(Decision::Defer(Answer::Wait));
    }
    Ok(match rule {
        Some(RuleMode::Wait) => Decision::Defer(Answer::Wait),
        Some(RuleMode::Async) => Decision::Defer(Answer::Async { prefer: false }),
        Some(RuleMode::Now) | None => Decision::Pass,
    })
}

/// Reads RFC 7240 `Prefer`: `respond-async`, optionally with `wait=N`.
/// Unknown preferences are ignored, as the RFC asks; the first occurrence
/// of a preference wins.
fn prefer(headers: &HeaderMap) -> Result<Option<Answer>, OptInError> {
    let mut respond_async = false;
    let mut wait: Option<Option<u64>> = None;
    for value in headers.get_all("prefer") {
        let value = value.to_str().map_err(|_| OptInError::NotText("prefer"))?;
        for item in value.split(',') {
            let token = item.split(';').next().unwrap_or("").trim();
            let (name, arg) = match token.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") {
                respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") && wait.is_none() {
                wait = Some(arg.and_then(|a| a.parse().ok()));
            }
        }
    }
    if !respond_async {
        return Ok(None);
    }
    Ok(Some(match wait.flatten() {
        Some(secs) if secs > 0 => {
            Answer::AsyncAfter(Duration::from_secs(secs).min(MAX_PREFER_WAIT))
        }
        _ => Answer::Async { prefer: true },
    }))
}

/// The `Preference-Applied` value for an answer that honoured `Prefer`.
pub fn preference_applied(answer: &Answer) -> Option<String> {
    match answer {
        Answer::Async { prefer: true } => Some("respond-async".to_owned()),
        Answer::AsyncAfter(wait) => Some(format!("respond-async, wait={}", wait.as_secs())),
        _ => None,
    }
}

/// The caller's deadline as unix milliseconds: `Carpool-Deadline` (seconds
/// from now or RFC 3339), else, for held calls, the SDK's declared read
/// timeout (`x-stainless-read-timeout`).
pub fn deadline(
    headers: &HeaderMap,
    answer: &Answer,
    now: SystemTime,
) -> Result<Option<i64>, OptInError> {
    if let Some(raw) = header(headers, "carpool-deadline")? {
        let at = parse_deadline(raw, now).ok_or_else(|| OptInError::BadDeadline(raw.to_owned()))?;
        if at <= now {
            return Err(OptInError::DeadlineInPast(raw.to_owned()));
        }
        return Ok(Some(unix_ms(at)));
    }
    if *answer == Answer::Wait {
        let declared = header(headers, "x-stainless-read-timeout")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_READ_TIMEOUT_SECS);
        if let Some(at) = declared
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .and_then(|d| now.checked_add(d))
        {
            return Ok(Some(unix_ms(at)));
        }
    }
    Ok(None)
}

fn parse_deadline(raw: &str, now: SystemTime) -> Option<SystemTime> {
    if let Ok(secs) = raw.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0 && secs < 1e9)
            .then(|| Duration::try_from_secs_f64(secs).ok())
            .flatten()
            .and_then(|d| now.checked_add(d));
    }
    humantime::parse_rfc3339_weak(raw).ok()
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// True when the call is an SDK's automatic retry (`x-stainless-retry-count` > 0).
pub fn is_sdk_retry(headers: &HeaderMap) -> bool {
    headers
        .get("x-stainless-retry-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn explicit_mode_header_beats_prefix_and_rule() {
        let h = headers(&[("carpool-mode", "now")]);
        assert_eq!(decide(&h, true, Some(RuleMode::Wait)), Ok(Decision::Pass));
        let h = headers(&[("carpool-mode", "async")]);
        assert_eq!(
            decide(&h, false, Some(RuleMode::Now)),
            Ok(Decision::Defer(Answer::Async { prefer: false }))
        );
        assert!(matches!(
            decide(&headers(&[("carpool-mode", "later")]), false, None),
            Err(OptInError::UnknownMode(_))
        ));
    }

    #[test]
    fn prefer_respond_async_with_and_without_wait() {
        let h = headers(&[("prefer", "respond-async")]);
        let d = decide(&h, false, None).unwrap();
        assert_eq!(d, Decision::Defer(Answer::Async { prefer: true }));
        let h = headers(&[("prefer", "handling=lenient, respond-async, wait=10")]);
        let Decision::Defer(answer) = decide(&h, false, None).unwrap() else {
            panic!()
        };
        assert_eq!(answer, Answer::AsyncAfter(Duration::from_secs(10)));
        assert_eq!(
            preference_applied(&answer).as_deref(),
            Some("respond-async, wait=10")
        );
        // wait alone is not a request to defer
        assert_eq!(
            decide(&headers(&[("prefer", "wait=5")]), false, None),
            Ok(Decision::Pass)
        );
    }

    #[test]
    fn prefix_means_wait_and_rules_apply_last() {
        assert_eq!(
            decide(&HeaderMap::new(), true, None),
            Ok(Decision::Defer(Answer::Wait))
        );
        assert_eq!(
            decide(&HeaderMap::new(), false, Some(RuleMode::Async)),
            Ok(Decision::Defer(Answer::Async { prefer: false }))
        );
        assert_eq!(decide(&HeaderMap::new(), false, None), Ok(Decision::Pass));
    }

    #[test]
    fn deadline_reads_seconds_rfc3339_and_sdk_read_timeout() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let h = headers(&[("carpool-deadline", "30")]);
        assert_eq!(deadline(&h, &Answer::Wait, now), Ok(Some(1_030_000)));
        let h = headers(&[("carpool-deadline", "1970-01-01T00:20:00Z")]);
        assert_eq!(deadline(&h, &Answer::Wait, now), Ok(Some(1_200_000)));
        let h = headers(&[("carpool-deadline", "tomorrow-ish")]);
        assert!(matches!(
            deadline(&h, &Answer::Wait, now),
            Err(OptInError::BadDeadline(_))
        ));
        let h = headers(&[("x-stainless-read-timeout", "600.0")]);
        assert_eq!(deadline(&h, &Answer::Wait, now), Ok(Some(1_600_000)));
        assert_eq!(
            deadline(&h, &Answer::Async { prefer: false }, now),
            Ok(None)
        );
    }

    #[test]
    fn sdk_retry_is_a_positive_retry_count() {
        assert!(!is_sdk_retry(&headers(&[("x-stainless-retry-count", "0")])));
        assert!(is_sdk_retry(&headers(&[("x-stainless-retry-count", "2")])));
        assert!(!is_sdk_retry(&HeaderMap::new()));
    }
}
