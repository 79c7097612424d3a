//! Is this call deferred, passed through, or refused? A pure function of the
//! request line, headers, the body's model and the config: no I/O.
//!
//! Reading the opt-ins (`Carpool-Mode`, `Prefer`, the defer prefix, rules)
//! is [`crate::deferral::optin::decide`]'s job; this adds what the proxy
//! knows: `Carpool-Callback` (an async opt-in), whether the routed upstream
//! can batch the endpoint, and whether the body can be deferred at all.

use axum::http::{HeaderMap, Method};

use crate::config::{Config, Mode, UpstreamConfig};
pub use crate::deferral::optin::Answer;
use crate::deferral::optin::{self, RuleMode};
use crate::proxy::inspect::Mistyped;
use crate::server::ApiError;

pub const MODE_HEADER: &str = "carpool-mode";
pub const CALLBACK_HEADER: &str = "carpool-callback";

/// What the body inspection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    /// Not JSON (or no body): streamed through unread.
    NotInspected,
    /// JSON with this `model` (or none).
    Json { model: Option<&'a str> },
    /// Declared JSON but does not parse.
    Malformed,
    /// JSON whose `model` or `stream` has the wrong type.
    Mistyped(Mistyped),
}

impl<'a> Body<'a> {
    pub fn model(self) -> Option<&'a str> {
        match self {
            Self::Json { model } => model,
            _ => None,
        }
    }
}

/// One call, as far as the decision needs it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub method: &'a Method,
    /// The path with any defer prefix already stripped, e.g. `/v1/embeddings`.
    pub path: &'a str,
    /// Whether the caller used the defer prefix (`/defer/v1/...`).
    pub via_defer_prefix: bool,
    pub headers: &'a HeaderMap,
    pub body: Body<'a>,
    /// The caller's `[[clients]]` name, for rules by client.
    pub client: Option<&'a str>,
    pub upstream: &'a UpstreamConfig,
}

#[derive(Debug)]
pub enum Decision {
    Pass,
    /// Deferred, answered as `Answer` says (the deferral path reads
    /// `Carpool-Callback`, deadlines and idempotency itself).
    Defer(Answer),
    Reject(ApiError),
}

pub fn classify(call: &Call<'_>, config: &Config) -> Decision {
    let rule = config
        .rule_mode(call.path, call.body.model(), call.client)
        .map(|m| match m {
            Mode::Wait => RuleMode::Wait,
            Mode::Async => RuleMode::Async,
            Mode::Now => RuleMode::Now,
        });
    let opted =
        if call.headers.contains_key(CALLBACK_HEADER) && !call.headers.contains_key(MODE_HEADER) {
            Ok(optin::Decision::Defer(Answer::Async { prefer: false }))
        } else {
            optin::decide(call.headers, call.via_defer_prefix, rule)
        };
    let answer = match opted {
        Err(e) => return Decision::Reject(e.into()),
        Ok(optin::Decision::Pass) => return Decision::Pass,
        Ok(optin::Decision::Defer(answer)) => answer,
    };
    let batchable = call.method == Method::POST && call.upstream.dialect.batchable(call.path);
    if !batchable {
        // A caller who asked by header to defer this very call is told it
        // cannot be; a prefix or a rule that covers every path just lets
        // the calls it cannot defer pass through.
        let asked = call.headers.contains_key(MODE_HEADER)
            || call.headers.contains_key(CALLBACK_HEADER)
            || optin::preference_applied(&answer).is_some();
        if asked {
            return Decision::Reject(ApiError::Unprocessable {
                message: format!(
                    "{} {} cannot be deferred: upstream {} ({}) has no batch API for it",
                    call.method,
                    call.path,
                    call.upstream.name,
                    call.upstream.dialect.as_str()
                ),
                code: "not_batchable",
            });
        }
        return Decision::Pass;
    }
    match call.body {
        Body::Malformed => Decision::Reject(ApiError::bad_request(
            "request body is not valid JSON",
            "invalid_json",
        )),
        Body::Mistyped(field) => {
            let (param, expected) = match field {
                Mistyped::Model => ("model", "a string"),
                Mistyped::Stream => ("stream", "a boolean"),
            };
            Decision::Reject(ApiError::BadRequest {
                message: format!("\"{param}\" must be {expected}"),
                param: Some(param.into()),
                code: "invalid_type",
            })
        }
        Body::NotInspected => Decision::Reject(ApiError::bad_request(
            "a deferred call needs a JSON body (Content-Type: application/json)",
            "invalid_content_type",
        )),
        Body::Json { model: None } => Decision::Reject(ApiError::BadRequest {
            message: "a deferred call needs a \"model\" in its body".into(),
            param: Some("model".into()),
            code: "missing_model",
        }),
        Body::Json { model: Some(_) } => Decision::Defer(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;
    use std::collections::BTreeMap;

    const CONFIG: &str = r#"
[[upstreams]]
name = "m"
dialect = "mistral"
base_url = "http://h"
[[clients]]
name = "batchy"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[[rules]]
client = "batchy"
mode = "async"
[[rules]]
path = "/v1/embeddings"
mode = "wait"
"#;

    fn decide(
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        client: Option<&str>,
    ) -> Decision {
        let config = from_toml_str(CONFIG, &BTreeMap::new()).unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (path, via) = match path.strip_prefix("/defer") {
            Some(rest) => (rest, true),
            None => (path, false),
        };
        let call = Call {
            method: &method,
            path,
            via_defer_prefix: via,
            headers: &h,
            body,
            client,
            upstream: &config.upstreams[0],
        };
        classify(&call, &config)
    }

    const CHAT: Body<'static> = Body::Json {
        model: Some("mistral-small"),
    };

    #[test]
    fn plain_calls_pass_through() {
        let d = decide(Method::POST, "/v1/chat/completions", &[], CHAT, None);
        assert!(matches!(d, Decision::Pass));
    }

    #[test]
    fn explicit_header_wins_over_rules() {
        let d = decide(
            Method::POST,
            "/v1/embeddings",
            &[("carpool-mode", "now")],
            CHAT,
            None,
        );
        assert!(matches!(d, Decision::Pass));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[("carpool-mode", "wait")],
            CHAT,
            Some("batchy"),
        );
        assert!(matches!(d, Decision::Defer(Answer::Wait)));
    }

    #[test]
    fn prefer_respond_async_and_callback_defer_async() {
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[("prefer", "handling=lenient, respond-async; x, wait=10")],
            CHAT,
            None,
        );
        assert!(matches!(d, Decision::Defer(Answer::AsyncAfter(_))));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[("carpool-callback", "https://example.test/hook")],
            CHAT,
            None,
        );
        assert!(matches!(
            d,
            Decision::Defer(Answer::Async { prefer: false })
        ));
    }

    #[test]
    fn defer_prefix_means_wait_but_lets_other_calls_pass() {
        let d = decide(Method::POST, "/defer/v1/chat/completions", &[], CHAT, None);
        assert!(matches!(d, Decision::Defer(Answer::Wait)));
        let d = decide(
            Method::GET,
            "/defer/v1/models",
            &[],
            Body::NotInspected,
            None,
        );
        assert!(matches!(d, Decision::Pass));
    }

    #[test]
    fn rules_match_by_path_and_client() {
        let d = decide(Method::POST, "/v1/embeddings", &[], CHAT, None);
        assert!(matches!(d, Decision::Defer(Answer::Wait)));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[],
            CHAT,
            Some("batchy"),
        );
        assert!(matches!(d, Decision::Defer(Answer::Async { .. })));
    }

    #[test]
    fn async_on_an_endpoint_the_dialect_cannot_batch_is_422() {
        let d = decide(
            Method::POST,
            "/v1/completions",
            &[("carpool-mode", "async")],
            CHAT,
            None,
        );
        assert!(matches!(
            d,
            Decision::Reject(ApiError::Unprocessable { .. })
        ));
    }

    #[test]
    fn deferral_needs_json_with_a_model() {
        let h = [("carpool-mode", "wait")];
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &h,
            Body::Malformed,
            None,
        );
        assert!(matches!(
            d,
            Decision::Reject(ApiError::BadRequest {
                code: "invalid_json",
                ..
            })
        ));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &h,
            Body::Json { model: None },
            None,
        );
        assert!(matches!(
            d,
            Decision::Reject(ApiError::BadRequest {
                code: "missing_model",
                ..
            })
        ));
    }

    #[test]
    fn unknown_mode_header_is_400() {
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[("carpool-mode", "later")],
            CHAT,
            None,
        );
        assert!(matches!(d, Decision::Reject(ApiError::BadRequest { .. })));
    }
}
