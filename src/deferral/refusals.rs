//! Bodies a batch API is known to refuse, refused at intake instead (SPEC
//! section 1): before anything is stored, with the parameter named, so the
//! caller learns at once rather than from a failed batch line. Pure.

use serde::Deserialize;
use serde_json::Value;

use crate::server::error::ApiError;

/// The top-level members a refusal looks at; the rest is not built.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    background: Option<Value>,
    #[serde(default)]
    model: Option<Value>,
}

/// `Ok` when the body may go to a batch line of `endpoint`.
///
/// `/v1/responses`: `background: true` asks OpenAI to run the response in
/// the background and be polled for it, which a batch line cannot do.
/// (`stream` is not refused: it is removed from the line, and a streamed
/// wait-mode call is answered as a stream.)
///
/// Every endpoint: a `model` that is empty (or only spaces) is refused as
/// missing; OpenAI's batch validation would refuse the line
/// (`invalid_request` / `model_not_found`, reference section 0) and sink
/// the batch with it.
pub fn check(endpoint: &str, body: &[u8]) -> Result<(), ApiError> {
    let Ok(probe) = serde_json::from_slice::<Probe>(body) else {
        // Not an object: the batch line builder reports it.
        return Ok(());
    };
    if matches!(&probe.model, Some(Value::String(m)) if m.trim().is_empty()) {
        return Err(ApiError::BadRequest {
            message: "a deferred call needs a non-empty \"model\" in its body: the batch API refuses a line without one".to_owned(),
            param: Some("model".to_owned()),
            code: "missing_model",
        });
    }
    if endpoint != "/v1/responses" {
        return Ok(());
    }
    if probe.background == Some(Value::Bool(true)) {
        return Err(ApiError::BadRequest {
            message: "`background: true` cannot be deferred: the batch API does not run background responses; send it with `Carpool-Mode: now`, or drop `background`".to_owned(),
            param: Some("background".to_owned()),
            code: "unsupported_parameter",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_true_is_refused_on_responses_only() {
        let bg = br#"{"model":"m","input":"hi","background":true}"#;
        match check("/v1/responses", bg) {
            Err(ApiError::BadRequest { param, code, .. }) => {
                assert_eq!(param.as_deref(), Some("background"));
                assert_eq!(code, "unsupported_parameter");
            }
            other => panic!("expected a 400, got {other:?}"),
        }
        assert!(check("/v1/chat/completions", bg).is_ok());
        for empty in [&br#"{"model":""}"#[..], br#"{"model":"  "}"#] {
            assert!(matches!(
                check("/v1/chat/completions", empty),
                Err(ApiError::BadRequest {
                    code: "missing_model",
                    ..
                })
            ));
        }
        for fine in [
            &br#"{"model":"m","input":"hi","background":false}"#[..],
            br#"{"model":"m","input":"hi","stream":true}"#,
            br#"{"model":"m","input":"hi","background":"yes"}"#,
            br#"[1]"#,
        ] {
            assert!(check("/v1/responses", fine).is_ok());
        }
    }
}
