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
    #[serde(default)]
    max_tokens: Option<Value>,
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
    if endpoint == "/v1/messages" {
        return messages(&probe);
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

/// `/v1/messages`: Anthropic's batch refuses the whole create for a
/// request without a `model`, or whose `max_tokens` is missing or below 1
/// (reference section 0).
fn messages(probe: &Probe) -> Result<(), ApiError> {
    if !matches!(&probe.model, Some(Value::String(_))) {
        return Err(ApiError::BadRequest {
            message: "model: Field required (a deferred call needs a \"model\" in its body)"
                .to_owned(),
            param: Some("model".to_owned()),
            code: "missing_model",
        });
    }
    match probe.max_tokens.as_ref().and_then(Value::as_i64) {
        Some(n) if n >= 1 => Ok(()),
        _ => Err(ApiError::BadRequest {
            message:
                "max_tokens: must be an integer of at least 1; the batch API refuses anything else"
                    .to_owned(),
            param: Some("max_tokens".to_owned()),
            code: "invalid_max_tokens",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_need_a_model_and_max_tokens_of_at_least_one() {
        for bad in [
            &br#"{"model":"claude","max_tokens":0,"messages":[]}"#[..],
            br#"{"model":"claude","max_tokens":-3}"#,
            br#"{"model":"claude","max_tokens":"5"}"#,
            br#"{"model":"claude"}"#,
            br#"{"max_tokens":5}"#,
        ] {
            assert!(
                check("/v1/messages", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(check("/v1/messages", br#"{"model":"claude","max_tokens":1}"#).is_ok());
        assert!(check("/v1/chat/completions", br#"{"model":"m","max_tokens":0}"#).is_ok());
    }

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
