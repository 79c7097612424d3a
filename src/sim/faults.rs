//! Faults on demand: what can go wrong, and the book that hands them out.
//!
//! A fault is data (serde, so the control API and the handle share one
//! shape). Route faults match `"METHOD /path/template"` (placeholder names do
//! not matter, `*` matches any method) or the literal path.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

fn one() -> u32 {
    1
}

fn server_error() -> u16 {
    500
}

/// One thing the simulator does wrong on purpose.
///
/// `count` is how many times the fault fires before it is used up; `0`
/// means it fires until the faults are cleared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Extra latency on every response (or only on `route`).
    Latency {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        route: Option<String>,
        ms: u64,
    },
    /// Answer `status` (with an OpenAI-style error body, and `Retry-After`
    /// when given) instead of handling the call.
    HttpError {
        route: String,
        status: u16,
        #[serde(default = "one")]
        count: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
        /// The error body's `code` (and `type`) instead of the default
        /// (e.g. `insufficient_quota`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// A raw `Retry-After` header value, sent as given (wins over
        /// `retry_after`), e.g. `1e30`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_raw: Option<String>,
    },
    /// Close the connection without any response.
    DropConnection {
        route: String,
        #[serde(default = "one")]
        count: u32,
    },
    /// Handle the call, then hold its response (logged as handled) until
    /// the faults are cleared or held responses are released: the caller
    /// is left waiting on something that already happened. With
    /// `after_lines`, the head and that many body lines go out first, then
    /// the body pauses (a download stalled mid-file).
    HoldResponse {
        route: String,
        #[serde(default = "one")]
        count: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_lines: Option<u64>,
    },
    /// Handle the call, then pad the body's `line`-th line (1-based) with
    /// `bytes` spaces before its newline: a result line longer than a
    /// client accepts, still valid JSON.
    PadLine {
        route: String,
        line: u64,
        bytes: u64,
        #[serde(default = "one")]
        count: u32,
    },
    /// The next job(s) created end this way.
    NextJob {
        outcome: JobOutcome,
        #[serde(default = "one")]
        count: u32,
    },
    /// The next job(s) created fail validation at their `line`-th input line
    /// (1-based) with `code` (`invalid_url`, `mismatched_model`, ...), as if
    /// that line were bad: OpenAI names the line in `errors.data[]`, Mistral
    /// only words it. A job with fewer lines is not touched. The line is
    /// bad only to the provider: carpool's intake cannot see it.
    InvalidLine {
        line: usize,
        code: String,
        #[serde(default = "one")]
        count: u32,
    },
    /// Synchronous calls asking for `service_tier: "flex"` are refused with
    /// `status` (429 or 503: no flex capacity; 400: no flex for the model).
    RefuseFlex {
        status: u16,
        #[serde(default = "one")]
        count: u32,
    },
    /// Synchronous calls asking for flex are answered `ms` late (flex is
    /// slower than the standard tier); not used up.
    SlowFlex { ms: u64 },
    /// Lines of jobs created while this is set fail with `status`: those
    /// whose `custom_id` is listed, plus a deterministic `fraction` of all.
    FailLines {
        #[serde(default)]
        custom_ids: Vec<String>,
        #[serde(default)]
        fraction: f64,
        #[serde(default = "server_error")]
        status: u16,
    },
}

/// How a job hit by [`Fault::NextJob`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    /// FAILED / failed, with a job-level error, no lines processed.
    Failed,
    /// TIMEOUT_EXCEEDED / expired, with the first half of the lines done.
    Expired,
    /// Stays RUNNING / in_progress (half done) until the faults are cleared.
    Stuck,
}

impl Fault {
    /// `count` 429s with `Retry-After: retry_after` on `route`.
    pub fn rate_limited(route: &str, count: u32, retry_after: u64) -> Self {
        Self::HttpError {
            route: route.to_owned(),
            status: 429,
            count,
            retry_after: Some(retry_after),
            code: None,
            retry_after_raw: None,
        }
    }

    /// `count` responses of `status` whose error `code` and `type` are `code`.
    pub fn status_with_code(route: &str, status: u16, count: u32, code: &str) -> Self {
        Self::HttpError {
            route: route.to_owned(),
            status,
            count,
            retry_after: None,
            code: Some(code.to_owned()),
            retry_after_raw: None,
        }
    }

    /// `count` 429s sending `Retry-After: raw` exactly as given.
    pub fn rate_limited_raw(route: &str, count: u32, raw: &str) -> Self {
        Self::HttpError {
            route: route.to_owned(),
            status: 429,
            count,
            retry_after: None,
            code: None,
            retry_after_raw: Some(raw.to_owned()),
        }
    }

    /// `count` responses of `status` on `route`.
    pub fn status(route: &str, status: u16, count: u32) -> Self {
        Self::HttpError {
            route: route.to_owned(),
            status,
            count,
            retry_after: None,
            code: None,
            retry_after_raw: None,
        }
    }

    /// `count` connections closed without a response on `route`.
    pub fn drop_connection(route: &str, count: u32) -> Self {
        Self::DropConnection {
            route: route.to_owned(),
            count,
        }
    }

    /// `count` calls on `route` handled, their responses held until released.
    pub fn hold_response(route: &str, count: u32) -> Self {
        Self::HoldResponse {
            route: route.to_owned(),
            count,
            after_lines: None,
        }
    }

    /// `count` calls on `route` send their head and `lines` body lines, then
    /// pause until released.
    pub fn hold_body_after_lines(route: &str, lines: u64, count: u32) -> Self {
        Self::HoldResponse {
            route: route.to_owned(),
            count,
            after_lines: Some(lines),
        }
    }

    /// `count` calls on `route` whose `line`-th body line gets `bytes` spaces.
    pub fn pad_line(route: &str, line: u64, bytes: u64, count: u32) -> Self {
        Self::PadLine {
            route: route.to_owned(),
            line,
            bytes,
            count,
        }
    }

    pub fn latency(extra: Duration) -> Self {
        Self::Latency {
            route: None,
            ms: u64::try_from(extra.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The next job's `line`-th input line (1-based) refused with `code`.
    pub fn invalid_line(line: usize, code: &str) -> Self {
        Self::InvalidLine {
            line,
            code: code.to_owned(),
            count: 1,
        }
    }

    pub fn next_job(outcome: JobOutcome) -> Self {
        Self::NextJob { outcome, count: 1 }
    }

    pub fn fail_custom_ids<I, S>(ids: I, status: u16) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::FailLines {
            custom_ids: ids.into_iter().map(Into::into).collect(),
            fraction: 0.0,
            status,
        }
    }

    pub fn fail_fraction(fraction: f64, status: u16) -> Self {
        Self::FailLines {
            custom_ids: Vec::new(),
            fraction,
            status,
        }
    }
}

/// What the edge must do with one call.
#[derive(Debug, Default, PartialEq)]
pub struct RouteVerdict {
    pub extra_latency: Duration,
    pub error: Option<(u16, Option<u64>)>,
    /// With `error`: the body's `code`/`type` to use instead of the default.
    pub error_code: Option<String>,
    /// With `error`: a raw `Retry-After` value to send as given.
    pub error_retry_after_raw: Option<String>,
    pub drop_connection: bool,
    /// Handle the call, then hold the response until released.
    pub hold_response: bool,
    /// With `hold_response`: send this many body lines before holding.
    pub hold_after_lines: Option<u64>,
    /// Pad this line (1-based) of the handled body with this many spaces.
    pub pad_line: Option<(u64, u64)>,
}

/// Which lines of a new job fail, captured when the job is created.
#[derive(Clone, Debug, Default)]
pub struct LineFailures {
    pub custom_ids: HashSet<String>,
    pub fraction: f64,
    pub status: u16,
}

impl LineFailures {
    /// The status a line fails with, if it does.
    pub fn status_for(&self, custom_id: &str) -> Option<u16> {
        let picked = self.custom_ids.contains(custom_id)
            || (self.fraction > 0.0 && unit_hash(custom_id) < self.fraction);
        picked.then_some(self.status)
    }
}

/// A stable number in [0, 1) for a custom id, so fractions are reproducible.
fn unit_hash(s: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(s.as_bytes());
    let n = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// The active faults. Used-up faults are removed.
#[derive(Debug, Default)]
pub struct FaultBook {
    faults: Vec<Fault>,
}

impl FaultBook {
    pub fn list(&self) -> Vec<Fault> {
        self.faults.clone()
    }

    pub fn set(&mut self, faults: Vec<Fault>) {
        self.faults = faults;
    }

    pub fn add(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    pub fn clear(&mut self) {
        self.faults.clear();
    }

    /// Consume what applies to a call of `method` on `template` (`path`).
    pub fn on_call(&mut self, method: &str, template: &str, path: &str) -> RouteVerdict {
        let mut verdict = RouteVerdict::default();
        let mut spent = Vec::new();
        for (i, fault) in self.faults.iter_mut().enumerate() {
            match fault {
                Fault::Latency { route, ms } => {
                    if route
                        .as_deref()
                        .map_or(true, |r| route_matches(r, method, template, path))
                    {
                        verdict.extra_latency += Duration::from_millis(*ms);
                    }
                }
                Fault::HttpError {
                    route,
                    status,
                    count,
                    retry_after,
                    code,
                    retry_after_raw,
                } => {
                    if verdict.error.is_none()
                        && !verdict.drop_connection
                        && route_matches(route, method, template, path)
                    {
                        verdict.error = Some((*status, *retry_after));
                        verdict.error_code = code.clone();
                        verdict.error_retry_after_raw = retry_after_raw.clone();
                        if take(count) {
                            spent.push(i);
                        }
                    }
                }
                Fault::DropConnection { route, count } => {
                    if verdict.error.is_none()
                        && !verdict.drop_connection
                        && route_matches(route, method, template, path)
                    {
                        verdict.drop_connection = true;
                        if take(count) {
                            spent.push(i);
                        }
                    }
                }
                Fault::HoldResponse {
                    route,
                    count,
                    after_lines,
                } => {
                    if !verdict.hold_response && route_matches(route, method, template, path) {
                        verdict.hold_response = true;
                        verdict.hold_after_lines = *after_lines;
                        if take(count) {
                            spent.push(i);
                        }
                    }
                }
                Fault::PadLine {
                    route,
                    line,
                    bytes,
                    count,
                } => {
                    if verdict.pad_line.is_none() && route_matches(route, method, template, path) {
                        verdict.pad_line = Some((*line, *bytes));
                        if take(count) {
                            spent.push(i);
                        }
                    }
                }
                Fault::NextJob { .. }
                | Fault::FailLines { .. }
                | Fault::InvalidLine { .. }
                | Fault::RefuseFlex { .. }
                | Fault::SlowFlex { .. } => {}
            }
        }
        for i in spent.into_iter().rev() {
            self.faults.remove(i);
        }
        verdict
    }

    /// What happens to a synchronous call that asked for flex: its extra
    /// latency, and the status it is refused with, if any (consumed).
    pub fn on_flex_call(&mut self) -> (Duration, Option<u16>) {
        let mut delay = Duration::ZERO;
        let mut refused = None;
        let mut spent = None;
        for (i, fault) in self.faults.iter_mut().enumerate() {
            match fault {
                Fault::SlowFlex { ms } => delay += Duration::from_millis(*ms),
                Fault::RefuseFlex { status, count } if refused.is_none() => {
                    refused = Some(*status);
                    if take(count) {
                        spent = Some(i);
                    }
                }
                _ => {}
            }
        }
        if let Some(i) = spent {
            self.faults.remove(i);
        }
        (delay, refused)
    }

    /// Consume a pending job outcome for a job being created.
    pub fn take_job_outcome(&mut self) -> Option<JobOutcome> {
        let pos = self
            .faults
            .iter()
            .position(|f| matches!(f, Fault::NextJob { .. }))?;
        let Fault::NextJob { outcome, count } = &mut self.faults[pos] else {
            return None;
        };
        let outcome = *outcome;
        if take(count) {
            self.faults.remove(pos);
        }
        Some(outcome)
    }

    /// Consume a pending invalid line for a job of `lines` lines being
    /// created: its line number and code.
    pub fn take_invalid_line(&mut self, lines: usize) -> Option<(usize, String)> {
        let pos = self.faults.iter().position(
            |f| matches!(f, Fault::InvalidLine { line, .. } if (1..=lines).contains(line)),
        )?;
        let Fault::InvalidLine { line, code, count } = &mut self.faults[pos] else {
            return None;
        };
        let picked = (*line, code.clone());
        if take(count) {
            self.faults.remove(pos);
        }
        Some(picked)
    }

    /// The line failures in force now (all `FailLines` faults merged).
    pub fn line_failures(&self) -> LineFailures {
        let mut out = LineFailures {
            status: 500,
            ..LineFailures::default()
        };
        for fault in &self.faults {
            if let Fault::FailLines {
                custom_ids,
                fraction,
                status,
            } = fault
            {
                out.custom_ids.extend(custom_ids.iter().cloned());
                out.fraction = out.fraction.max(*fraction);
                out.status = *status;
            }
        }
        out
    }
}

/// Counts one use; true when the fault is now used up (`0` never is).
fn take(count: &mut u32) -> bool {
    match *count {
        0 => false,
        1 => true,
        _ => {
            *count -= 1;
            false
        }
    }
}

/// Does a fault's route (`"POST /v1/files"`, `"* /v1/batches/{id}"`, or a
/// literal path) cover this call?
pub fn route_matches(route: &str, method: &str, template: &str, path: &str) -> bool {
    let (want_method, want_path) = match route.trim().split_once(' ') {
        Some((m, p)) => (m.trim(), p.trim()),
        None => ("*", route.trim()),
    };
    if want_method != "*" && !want_method.eq_ignore_ascii_case(method) {
        return false;
    }
    want_path == path || normalize(want_path) == normalize(template)
}

/// `/v1/files/{file_id}` and `/v1/files/{id}` compare equal.
fn normalize(template: &str) -> String {
    template
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "{}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn route_matches_template_whatever_the_placeholder_names() {
        assert!(route_matches(
            "GET /v1/files/{id}",
            "GET",
            "/v1/files/{file_id}",
            "/v1/files/x"
        ));
        assert!(route_matches(
            "* /v1/files",
            "POST",
            "/v1/files",
            "/v1/files"
        ));
        assert!(route_matches(
            "GET /v1/files/x",
            "GET",
            "/v1/files/{file_id}",
            "/v1/files/x"
        ));
        assert!(!route_matches(
            "POST /v1/files",
            "GET",
            "/v1/files",
            "/v1/files"
        ));
        assert!(!route_matches(
            "POST /v1/batches",
            "POST",
            "/v1/files",
            "/v1/files"
        ));
    }

    #[test]
    fn http_error_fires_count_times_then_goes_away() {
        let mut book = FaultBook::default();
        book.add(Fault::rate_limited("POST /v1/files", 2, 3));
        for _ in 0..2 {
            let v = book.on_call("POST", "/v1/files", "/v1/files");
            assert_eq!(v.error, Some((429, Some(3))));
        }
        assert_eq!(book.on_call("POST", "/v1/files", "/v1/files").error, None);
        assert!(book.list().is_empty());
    }

    #[test]
    fn count_zero_fires_until_cleared() {
        let mut book = FaultBook::default();
        book.add(Fault::drop_connection("GET /v1/models", 0));
        for _ in 0..5 {
            assert!(
                book.on_call("GET", "/v1/models", "/v1/models")
                    .drop_connection
            );
        }
        book.clear();
        assert!(
            !book
                .on_call("GET", "/v1/models", "/v1/models")
                .drop_connection
        );
    }

    #[test]
    fn fraction_of_lines_fails_close_to_the_fraction() {
        let failures = LineFailures {
            fraction: 0.3,
            status: 503,
            ..LineFailures::default()
        };
        let failed = (0..1000)
            .filter(|i| failures.status_for(&format!("req-{i}")).is_some())
            .count();
        assert!((230..370).contains(&failed), "{failed}");
    }

    #[test]
    fn next_job_outcome_is_consumed_once() {
        let mut book = FaultBook::default();
        book.add(Fault::next_job(JobOutcome::Stuck));
        assert_eq!(book.take_job_outcome(), Some(JobOutcome::Stuck));
        assert_eq!(book.take_job_outcome(), None);
    }

    #[test]
    fn hold_response_marks_matching_calls_until_used_up() {
        let mut book = FaultBook::default();
        book.add(Fault::hold_response("POST /v1/batches", 1));
        assert!(!book.on_call("POST", "/v1/files", "/v1/files").hold_response);
        assert!(
            book.on_call("POST", "/v1/batches", "/v1/batches")
                .hold_response
        );
        assert!(
            !book
                .on_call("POST", "/v1/batches", "/v1/batches")
                .hold_response
        );
    }

    #[test]
    fn faults_round_trip_through_json() {
        let f: Fault = serde_json::from_str(
            r#"{"kind":"http_error","route":"POST /v1/batches","status":500}"#,
        )
        .unwrap();
        assert_eq!(f, Fault::status("POST /v1/batches", 500, 1));
    }
}
