//! Anthropic Message Batches on the wire (reference section C), pure.
//!
//! Owns: the inline create body's framing (`{"requests":[{custom_id,
//! params}, …]}`), the batch object read into a [`JobView`], result lines
//! (`result.type` succeeded / errored / canceled / expired) read into a
//! neutral [`LineOutcome`], the `requests.N` a refused create names, and
//! RFC 3339 times. Does not own the HTTP calls ([`super::BatchClient`]).

use bytes::Bytes;
use serde_json::Value;

use super::jobs::{JobPhase, JobView, NamedLine};
use super::lines::{LineFailure, LineOutcome};

/// The version sent on carpool's own batch calls; every Messages version
/// so far is this one.
pub const API_VERSION: &str = "2023-06-01";

/// What opens the create body; the lines follow, `,`-separated, then [`CREATE_TAIL`].
pub const CREATE_HEAD: &[u8] = b"{\"requests\":[";
pub const CREATE_TAIL: &[u8] = b"]}";

pub const BATCHES_PATH: &str = "/v1/messages/batches";

/// The status a synchronous call would have answered an error `type` with.
pub fn status_of_error_type(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// The error `type` Anthropic answers a status with (the inverse of
/// [`status_of_error_type`], for errors carpool makes on Anthropic routes).
pub fn error_type_of_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// An Anthropic error body, `{"type":"error","error":{"type","message"}}`.
pub fn error_body(kind: &str, message: &str) -> Value {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Reads a batch object; `None` without an id.
///
/// `ended` is terminal; how it ended is told by its counts: every line
/// answered (succeeded or errored) is a completed job, one with canceled
/// lines a cancelled one, else one with expired lines an expired one, so
/// those lines go down the failure chain. The results are at
/// `/v1/messages/batches/{id}/results`; the batch id stands for the file.
pub fn parse_batch(v: &Value) -> Option<JobView> {
    let id = text(v, "id")?;
    let raw_status = text(v, "processing_status").unwrap_or_default();
    let counts = v.get("request_counts").cloned().unwrap_or(Value::Null);
    let (succeeded, errored, canceled, expired) = (
        count(&counts, "succeeded"),
        count(&counts, "errored"),
        count(&counts, "canceled"),
        count(&counts, "expired"),
    );
    let total = count(&counts, "processing") + succeeded + errored + canceled + expired;
    let phase = match raw_status.as_str() {
        "ended" if canceled > 0 => JobPhase::Cancelled,
        "ended" if expired > 0 => JobPhase::Expired,
        "ended" => JobPhase::Completed,
        _ => JobPhase::Running,
    };
    let results = v
        .get("results_url")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .map(|_| id.clone());
    Some(JobView {
        phase,
        raw_status,
        output_file: results,
        error_file: None,
        errors: Vec::new(),
        named_lines: Vec::new(),
        total,
        succeeded,
        failed: errored + canceled + expired,
        window: None,
        created_at: v
            .get("created_at")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .unwrap_or(0),
        id,
    })
}

/// One page of `GET /v1/messages/batches` (newest first) and the cursor
/// of the next (`after_id`).
pub fn parse_list(v: &Value) -> (Vec<JobView>, Option<String>) {
    let batches: Vec<JobView> = v
        .get("data")
        .and_then(Value::as_array)
        .map(|data| data.iter().filter_map(parse_batch).collect())
        .unwrap_or_default();
    let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
    let next = more
        .then(|| text(v, "last_id").or_else(|| batches.last().map(|b| b.id.clone())))
        .flatten();
    (batches, next)
}

/// A result line, when it is one of Anthropic's (`{custom_id, result}`).
pub fn parse_result(custom_id: String, result: &Value) -> LineOutcome {
    let kind = result.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "succeeded" => LineOutcome {
            custom_id,
            status_code: 200,
            body: Bytes::from(
                result
                    .get("message")
                    .map(Value::to_string)
                    .unwrap_or_else(|| "null".to_owned()),
            ),
            error: None,
        },
        "errored" => {
            // `error` is the body the synchronous call would have had.
            let body = result
                .get("error")
                .cloned()
                .unwrap_or_else(|| error_body("api_error", "the request failed"));
            let error_type = body
                .pointer("/error/type")
                .and_then(Value::as_str)
                .unwrap_or("api_error");
            LineOutcome {
                custom_id,
                status_code: status_of_error_type(error_type),
                body: Bytes::from(body.to_string()),
                error: None,
            }
        }
        "canceled" | "expired" => {
            let (status, message) = if kind == "expired" {
                (504, "the batch expired before this request was processed")
            } else {
                (
                    503,
                    "the batch was canceled before this request was processed",
                )
            };
            let kind_type = if kind == "expired" {
                "timeout_error"
            } else {
                "api_error"
            };
            LineOutcome {
                custom_id,
                status_code: status,
                body: Bytes::from(error_body(kind_type, message).to_string()),
                error: Some(LineFailure {
                    code: kind.to_owned(),
                    message: message.to_owned(),
                }),
            }
        }
        other => LineOutcome {
            custom_id,
            status_code: 502,
            body: Bytes::from(
                error_body("api_error", &format!("unknown result type `{other}`")).to_string(),
            ),
            error: Some(LineFailure {
                code: "unknown_result".to_owned(),
                message: format!("the provider returned a result of type `{other}`"),
            }),
        },
    }
}

/// The request indexes a refused create names (`requests.3.params…`,
/// 0-based), as 1-based lines with the provider's message.
pub fn named_requests(message: &str) -> Vec<NamedLine> {
    let mut out: Vec<NamedLine> = Vec::new();
    let mut rest = message;
    while let Some(at) = rest.find("requests.") {
        let after = &rest[at + "requests.".len()..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        rest = &after[digits.len()..];
        let Ok(index) = digits.parse::<u64>() else {
            continue;
        };
        let param = format!(
            "requests.{digits}{}",
            rest.split(|c: char| c == ':' || c.is_whitespace())
                .next()
                .unwrap_or("")
        );
        if !out.iter().any(|l| l.line == index + 1) {
            out.push(NamedLine {
                line: index + 1,
                code: "invalid_request_error".to_owned(),
                message: message.to_owned(),
                param: Some(param),
            });
        }
    }
    out
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of an RFC 3339 time (`2024-09-24T18:37:24.100435Z`,
/// or with a `+hh:mm` offset); fractions are dropped.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// Unix seconds as RFC 3339 in UTC (`2024-09-24T18:37:24Z`).
pub fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // H. Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_round_trips_and_reads_offsets_and_fractions() {
        for t in [0, 1_727_203_044, 951_782_400, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t), "{t}");
        }
        assert_eq!(format_rfc3339(1_727_203_044), "2024-09-24T18:37:24Z");
        assert_eq!(
            parse_rfc3339("2024-09-24T18:37:24.100435Z"),
            Some(1_727_203_044)
        );
        assert_eq!(
            parse_rfc3339("2024-09-24T20:37:24+02:00"),
            Some(1_727_203_044)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2024-13-24T18:37:24Z"), None);
    }

    #[test]
    fn an_ended_batch_is_completed_cancelled_or_expired_by_its_counts() {
        let batch = |counts: Value| {
            parse_batch(&json!({
                "id": "msgbatch_1", "type": "message_batch", "processing_status": "ended",
                "request_counts": counts, "created_at": "2024-09-24T18:37:24Z",
                "results_url": "https://x/v1/messages/batches/msgbatch_1/results",
            }))
            .unwrap()
        };
        let done = batch(
            json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}),
        );
        assert_eq!(done.phase, JobPhase::Completed);
        assert_eq!((done.total, done.succeeded, done.failed), (3, 2, 1));
        assert_eq!(done.output_file.as_deref(), Some("msgbatch_1"));
        assert_eq!(done.created_at, 1_727_203_044);
        let c = json!({"processing": 0, "succeeded": 1, "errored": 0, "canceled": 1, "expired": 0});
        assert_eq!(batch(c).phase, JobPhase::Cancelled);
        let e = json!({"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 2});
        assert_eq!(batch(e).phase, JobPhase::Expired);
        let running =
            parse_batch(&json!({"id": "b", "processing_status": "canceling", "results_url": null}))
                .unwrap();
        assert_eq!(running.phase, JobPhase::Running);
        assert_eq!(running.output_file, None);
    }

    #[test]
    fn result_types_map_to_the_synchronous_answer() {
        let ok = parse_result(
            "a".into(),
            &json!({"type": "succeeded", "message": {"id": "msg_1"}}),
        );
        assert_eq!(
            (ok.status_code, &ok.body[..]),
            (200, &br#"{"id":"msg_1"}"#[..])
        );
        let err = parse_result(
            "b".into(),
            &json!({"type": "errored", "error": {"type": "error", "error": {"type": "not_found_error", "message": "no model"}}}),
        );
        assert_eq!(err.status_code, 404);
        assert!(err.error.is_none(), "an errored line is an answer");
        let body: Value = serde_json::from_slice(&err.body).unwrap();
        assert_eq!(body["error"]["message"], "no model");
        let gone = parse_result("c".into(), &json!({"type": "expired"}));
        assert_eq!(gone.status_code, 504);
        assert_eq!(gone.error.unwrap().code, "expired");
        assert_eq!(
            parse_result("d".into(), &json!({"type": "canceled"})).status_code,
            503
        );
    }

    #[test]
    fn a_refused_create_names_its_requests_one_based() {
        let named = named_requests(
            "requests.2.params.max_tokens: Input should be greater than or equal to 1; requests.2.params.x: bad; requests.10: dup",
        );
        let lines: Vec<u64> = named.iter().map(|l| l.line).collect();
        assert_eq!(lines, vec![3, 11]);
        assert_eq!(
            named[0].param.as_deref(),
            Some("requests.2.params.max_tokens")
        );
        assert!(named_requests("model: unknown").is_empty());
    }

    #[test]
    fn statuses_and_error_types_agree() {
        for s in [400, 401, 403, 404, 413, 429, 500, 529] {
            assert_eq!(status_of_error_type(error_type_of_status(s)), s);
        }
    }
}
