//! Batch file lines, both ways: building an input line from a caller's body,
//! and reading an output or error line back into a neutral outcome. Pure.
//!
//! The caller's JSON is forwarded untouched except for what must change:
//! `stream` and `stream_options` (a batch line never streams). Values are
//! copied as raw text, in the caller's key order, so nothing the caller sent
//! is rebuilt through a narrow struct.

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::model::Dialect;

/// Keys a batch body never carries.
const STRIPPED_KEYS: &[&str] = &["stream", "stream_options"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("request body is not a JSON object: {0}")]
    BodyNotObject(String),
    #[error("result line is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("result line has no custom_id")]
    MissingCustomId,
}

/// A JSON object's members as raw text, in order.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for MembersVisitor<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((key, value));
                }
                Ok(RawObject(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

/// Appends one JSONL input line (with its trailing newline) to `out`.
///
/// Mistral: `{"custom_id":…,"body":{…}}`; OpenAI adds `"method":"POST"` and
/// `"url":<endpoint>`; Anthropic's is `{"custom_id":…,"params":{…}}`, one
/// element of the create call's `requests` (the newline is whitespace there). The model stays in the body for both: OpenAI needs it
/// there, and Mistral accepts it beside the job-level model.
pub fn write_input_line(
    dialect: Dialect,
    custom_id: &str,
    endpoint: &str,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), LineError> {
    let object: RawObject<'_> =
        serde_json::from_slice(body).map_err(|e| LineError::BodyNotObject(e.to_string()))?;
    out.extend_from_slice(b"{\"custom_id\":");
    push_json_string(out, custom_id);
    if dialect == Dialect::Openai {
        out.extend_from_slice(b",\"method\":\"POST\",\"url\":");
        push_json_string(out, endpoint);
    }
    out.extend_from_slice(if dialect == Dialect::Anthropic {
        b",\"params\":{".as_slice()
    } else {
        b",\"body\":{".as_slice()
    });
    let mut first = true;
    for (key, value) in &object.0 {
        if STRIPPED_KEYS.contains(&key.as_str()) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        push_json_string(out, key);
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    out.extend_from_slice(b"}}\n");
    Ok(())
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str cannot fail.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// What one output or error line says about one request.
#[derive(Clone, Debug, PartialEq)]
pub struct LineOutcome {
    pub custom_id: String,
    /// The status the synchronous call would have had.
    pub status_code: u16,
    /// The body the synchronous call would have had, verbatim when the
    /// provider gave one, else an OpenAI-style error object we build.
    pub body: Bytes,
    /// Set when the provider reported a failure that is not an HTTP answer
    /// (for example `batch_expired`).
    pub error: Option<LineFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineFailure {
    pub code: String,
    pub message: String,
}

impl LineOutcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status_code)
    }
}

#[derive(Deserialize)]
struct WireLine<'a> {
    #[serde(default)]
    custom_id: Option<String>,
    #[serde(default, borrow)]
    response: Option<WireResponse<'a>>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    /// Anthropic's `{type, message | error}`.
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireResponse<'a> {
    #[serde(default)]
    status_code: Option<u16>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
}

/// Reads one line of an output or error file, in any dialect (an
/// Anthropic line is told by its `result`).
///
/// Parsed defensively (reference A5, B5): `error` may be an object, a bare
/// string or null; `response` may be null; `status_code` may be missing.
pub fn parse_result_line(line: &[u8]) -> Result<LineOutcome, LineError> {
    let wire: WireLine<'_> =
        serde_json::from_slice(line).map_err(|e| LineError::InvalidJson(e.to_string()))?;
    let custom_id = wire
        .custom_id
        .filter(|id| !id.is_empty())
        .ok_or(LineError::MissingCustomId)?;
    if let Some(result) = wire.result {
        let result: Value = serde_json::from_str(result.get())
            .map_err(|e| LineError::InvalidJson(e.to_string()))?;
        return Ok(super::anthropic::parse_result(custom_id, &result));
    }
    let failure = wire.error.and_then(|raw| read_failure(raw.get()));
    let response = wire
        .response
        .filter(|r| r.body.is_some_and(|b| b.get() != "null"));

    if let Some(response) = response {
        let body = response.body.map(|b| b.get()).unwrap_or("null");
        let status_code = response
            .status_code
            .unwrap_or(if failure.is_some() { 500 } else { 200 });
        let error = match (&failure, status_code) {
            (Some(f), 200..=299) => Some(f.clone()),
            _ => None,
        };
        return Ok(LineOutcome {
            custom_id,
            status_code,
            body: Bytes::copy_from_slice(body.as_bytes()),
            error,
        });
    }

    let failure = failure.unwrap_or_else(|| LineFailure {
        code: "missing_response".to_owned(),
        message: "the provider returned neither a response nor an error for this request"
            .to_owned(),
    });
    let status_code = failure_status(&failure.code);
    Ok(LineOutcome {
        custom_id,
        status_code,
        body: error_body(&failure.code, &failure.message, "upstream_error"),
        error: Some(failure),
    })
}

fn read_failure(raw: &str) -> Option<LineFailure> {
    match serde_json::from_str::<Value>(raw).ok()? {
        Value::Null => None,
        Value::String(message) => Some(LineFailure {
            code: "batch_error".to_owned(),
            message,
        }),
        Value::Object(map) => {
            let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
            let nested = map.get("error").and_then(Value::as_object);
            let nested_text = |key: &str| {
                nested
                    .and_then(|m| m.get(key))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            Some(LineFailure {
                code: text("code")
                    .or_else(|| nested_text("code"))
                    .or_else(|| text("type"))
                    .unwrap_or_else(|| "batch_error".to_owned()),
                message: text("message")
                    .or_else(|| nested_text("message"))
                    .or_else(|| text("detail"))
                    .unwrap_or_else(|| raw.to_owned()),
            })
        }
        other => Some(LineFailure {
            code: "batch_error".to_owned(),
            message: other.to_string(),
        }),
    }
}

/// The status a held caller gets for a failure with no HTTP answer.
fn failure_status(code: &str) -> u16 {
    if is_expiry(code) {
        return 504;
    }
    match code {
        "batch_cancelled" | "cancelled" | "canceled" => 503,
        _ => 502,
    }
}

/// Whether a line's error code says the job ran out of time before the
/// line ran (OpenAI `batch_expired`, Mistral `TIMEOUT_EXCEEDED`).
pub fn is_expiry(code: &str) -> bool {
    matches!(
        code.to_ascii_lowercase().as_str(),
        "batch_expired" | "expired" | "timeout" | "timeout_exceeded"
    )
}

/// An OpenAI-style error object.
pub fn error_body(code: &str, message: &str, kind: &str) -> Bytes {
    let value = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Bytes::from(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(dialect: Dialect, body: &str) -> String {
        let mut out = Vec::new();
        write_input_line(
            dialect,
            "cpr_1",
            "/v1/chat/completions",
            body.as_bytes(),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn input_line_keeps_caller_json_and_drops_stream() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stream_options":{"include_usage":true},"tool_choice":null}"#;
        assert_eq!(
            line(Dialect::Mistral, body),
            "{\"custom_id\":\"cpr_1\",\"body\":{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}],\"tool_choice\":null}}\n"
        );
    }

    #[test]
    fn openai_input_line_names_method_and_url() {
        let parsed: Value =
            serde_json::from_str(line(Dialect::Openai, r#"{"model":"m"}"#).trim()).unwrap();
        assert_eq!(parsed["method"], "POST");
        assert_eq!(parsed["url"], "/v1/chat/completions");
        assert_eq!(parsed["body"]["model"], "m");
    }

    #[test]
    fn anthropic_input_line_carries_params() {
        let mut out = Vec::new();
        write_input_line(
            Dialect::Anthropic,
            "cpr_1",
            "/v1/messages",
            br#"{"model":"claude","max_tokens":5,"stream":true}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"custom_id\":\"cpr_1\",\"params\":{\"model\":\"claude\",\"max_tokens\":5}}\n"
        );
        let line = br#"{"custom_id":"cpr_2","result":{"type":"succeeded","message":{"id":"m"}}}"#;
        let outcome = parse_result_line(line).unwrap();
        assert!(outcome.succeeded());
        assert_eq!(&outcome.body[..], br#"{"id":"m"}"#);
    }

    #[test]
    fn input_line_refuses_a_body_that_is_not_an_object() {
        let mut out = Vec::new();
        let err = write_input_line(Dialect::Openai, "x", "/v1/embeddings", b"[1]", &mut out);
        assert!(matches!(err, Err(LineError::BodyNotObject(_))));
    }

    #[test]
    fn success_line_yields_status_and_verbatim_body() {
        let out = parse_result_line(
            br#"{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"r","body":{"id":"x","choices":[]}},"error":null}"#,
        )
        .unwrap();
        assert_eq!(out.custom_id, "a");
        assert_eq!(out.status_code, 200);
        assert_eq!(&out.body[..], br#"{"id":"x","choices":[]}"#);
        assert!(out.succeeded());
    }

    #[test]
    fn http_error_line_keeps_upstream_status_and_body() {
        let out = parse_result_line(
            br#"{"custom_id":"b","response":{"status_code":400,"body":{"error":{"message":"bad","type":"invalid_request_error"}}},"error":null}"#,
        )
        .unwrap();
        assert_eq!(out.status_code, 400);
        assert!(!out.succeeded());
        assert!(out.error.is_none());
    }

    #[test]
    fn expired_line_without_response_becomes_504_error() {
        let out = parse_result_line(
            br#"{"id":"r2","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"too late"}}"#,
        )
        .unwrap();
        assert_eq!(out.status_code, 504);
        assert_eq!(out.error.as_ref().unwrap().code, "batch_expired");
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(body["error"]["message"], "too late");
    }

    #[test]
    fn bare_string_error_is_accepted() {
        let out = parse_result_line(br#"{"custom_id":"d","error":"model overloaded"}"#).unwrap();
        assert_eq!(out.status_code, 502);
        assert_eq!(out.error.unwrap().message, "model overloaded");
    }

    #[test]
    fn line_without_custom_id_is_an_error() {
        assert_eq!(
            parse_result_line(br#"{"response":{"status_code":200,"body":{}}}"#),
            Err(LineError::MissingCustomId)
        );
        assert!(matches!(
            parse_result_line(b"not json"),
            Err(LineError::InvalidJson(_))
        ));
    }
}
