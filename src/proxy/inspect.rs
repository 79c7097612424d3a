//! Reading just enough of a request body to route it.
//!
//! The choice: a JSON body is read into memory (it is bounded by
//! `server.max_body`, and LLM JSON calls are small) so its `model` can pick
//! the upstream and the deferral path can parse it; any other body (file
//! uploads, multipart) is never read here and streams straight through,
//! counted against the same limit as it flows.

use std::borrow::Cow;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::server::ApiError;

pub enum Inspected {
    /// A JSON body, read whole; `model` is its top-level `model` string,
    /// `stream` its top-level `stream` flag.
    Json {
        bytes: Bytes,
        model: Option<String>,
        stream: bool,
    },
    /// Declared JSON but does not parse, or its `model` or `stream` has the
    /// wrong type (`mistyped` names that field); forwarded as is unless
    /// deferred.
    Malformed {
        bytes: Bytes,
        mistyped: Option<Mistyped>,
    },
    /// Not JSON: left unread.
    Stream(Body),
}

/// A top-level field a deferred call needs that has the wrong JSON type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mistyped {
    /// `model` is not a string.
    Model,
    /// `stream` is not a boolean.
    Stream,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Typed<Cow<'a, str>>>,
    #[serde(default)]
    stream: Option<Typed<bool>>,
}

/// A field of the expected type, or any other JSON value (read past), so
/// a mistyped `model` is told apart from a document that does not parse.
#[derive(Deserialize)]
#[serde(untagged)]
enum Typed<T> {
    Expected(T),
    Other(IgnoredAny),
}

/// Whether the `Content-Type` is JSON (`application/json` or `…+json`).
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// The declared `Content-Length`, if any and well formed.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Refuses a declared oversize body at once, reads JSON bodies up to
/// `max_body`, leaves every other body as a stream.
pub async fn inspect(
    headers: &HeaderMap,
    body: Body,
    max_body: u64,
) -> Result<Inspected, ApiError> {
    if content_length(headers).is_some_and(|n| n > max_body) {
        return Err(ApiError::PayloadTooLarge { limit: max_body });
    }
    if !is_json(headers) {
        return Ok(Inspected::Stream(body));
    }
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::PayloadTooLarge { limit: max_body });
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                "the request body could not be read",
                "body_read_failed",
            ))
        }
    };
    Ok(probe(bytes))
}

/// Finds the top-level `model` without building the rest of the document.
pub fn probe(bytes: Bytes) -> Inspected {
    if bytes.is_empty() {
        return Inspected::Json {
            bytes,
            model: None,
            stream: false,
        };
    }
    // A struct also deserializes from an array: only an object's fields
    // can be mistyped, any other document stays merely malformed.
    let object = bytes.trim_ascii_start().starts_with(b"{");
    let mistyped = |field| Inspected::Malformed {
        mistyped: object.then_some(field),
        bytes: bytes.clone(),
    };
    match serde_json::from_slice::<Probe<'_>>(&bytes) {
        Ok(p) => {
            let model = match p.model {
                None => None,
                Some(Typed::Expected(m)) => Some(m.into_owned()),
                Some(Typed::Other(_)) => return mistyped(Mistyped::Model),
            };
            let stream = match p.stream {
                None => false,
                Some(Typed::Expected(s)) => s,
                Some(Typed::Other(_)) => return mistyped(Mistyped::Stream),
            };
            Inspected::Json {
                bytes,
                model,
                stream,
            }
        }
        Err(_) => Inspected::Malformed {
            bytes,
            mistyped: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_model_and_ignores_everything_else() {
        let body = Bytes::from_static(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"model":"mistral-small","stream":true}"#,
        );
        match probe(body) {
            Inspected::Json { model, .. } => assert_eq!(model.as_deref(), Some("mistral-small")),
            _ => panic!("expected JSON"),
        }
        assert!(matches!(
            probe(Bytes::from_static(b"{nope")),
            Inspected::Malformed { mistyped: None, .. }
        ));
        assert!(matches!(
            probe(Bytes::from_static(b"[1,2]")),
            Inspected::Malformed { mistyped: None, .. }
        ));
        assert!(matches!(
            probe(Bytes::from_static(br#"{"model":5,"messages":[]}"#)),
            Inspected::Malformed {
                mistyped: Some(Mistyped::Model),
                ..
            }
        ));
        assert!(matches!(
            probe(Bytes::from_static(br#"{"model":"m","stream":"yes"}"#)),
            Inspected::Malformed {
                mistyped: Some(Mistyped::Stream),
                ..
            }
        ));
        match probe(Bytes::from_static(br#"{"model":null,"stream":null}"#)) {
            Inspected::Json { model, stream, .. } => {
                assert_eq!(model, None);
                assert!(!stream);
            }
            _ => panic!("expected JSON"),
        }
        match probe(Bytes::from_static(br#"{"model":"a\"b"}"#)) {
            Inspected::Json { model, .. } => assert_eq!(model.as_deref(), Some("a\"b")),
            _ => panic!("expected JSON"),
        }
    }

    #[test]
    fn recognises_json_media_types() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=x".parse().unwrap(),
        );
        assert!(!is_json(&h));
    }
}
