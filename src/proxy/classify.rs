//! Is this call deferred, passed through, or refused? A pure function of the
//! request line, headers, the body's model and the config: no I/O.
//!
//! Precedence (SPEC section 1): an explicit header wins over a configured
//! rule. `Carpool-Mode` first, then `Carpool-Callback` / `Prefer:
//! respond-async`, then the defer path prefix, then `[[rules]]`.

use axum::http::{HeaderMap, Method};

use crate::config::{Config, Mode, UpstreamConfig};
use crate::model::BATCHABLE_ENDPOINTS;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsyncVia {
    Header,
    Prefer,
    Callback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deferral {
    /// Hold the connection and answer like a synchronous call.
    Wait,
    /// Answer 202 with a handle (the deferral path reads `Prefer: wait=N`
    /// and `Carpool-Callback` itself).
    Async(AsyncVia),
}

#[derive(Debug)]
pub enum Decision {
    Pass,
    Defer(Deferral),
    Reject(ApiError),
}

pub fn classify(call: &Call<'_>, config: &Config) -> Decision {
    let explicit = match explicit_mode(call.headers) {
        Ok(m) => m,
        Err(e) => return Decision::Reject(e),
    };
    let wanted = match explicit {
        Some(Mode::Now) => return Decision::Pass,
        Some(Mode::Wait) => Some(Deferral::Wait),
        Some(Mode::Async) => Some(Deferral::Async(AsyncVia::Header)),
        None if call.headers.contains_key(CALLBACK_HEADER) => {
            Some(Deferral::Async(AsyncVia::Callback))
        }
        None if prefers_async(call.headers) => Some(Deferral::Async(AsyncVia::Prefer)),
        None if call.via_defer_prefix => Some(Deferral::Wait),
        None => match config.rule_mode(call.path, call.body.model(), call.client) {
            Some(Mode::Wait) => Some(Deferral::Wait),
            Some(Mode::Async) => Some(Deferral::Async(AsyncVia::Header)),
            Some(Mode::Now) | None => None,
        },
    };
    let Some(deferral) = wanted else {
        return Decision::Pass;
    };
    let batchable = call.method == Method::POST && call.upstream.dialect.batchable(call.path);
    if !batchable {
        // A held call can always be served realtime, and a base-URL prefix
        // covers every call an SDK makes (e.g. listing models); only an
        // explicit request for an async answer is refused.
        let asked_async = matches!(deferral, Deferral::Async(_))
            && call.method == Method::POST
            && BATCHABLE_ENDPOINTS.contains(&call.path);
        if asked_async {
            return Decision::Reject(ApiError::Unprocessable {
                message: format!(
                    "upstream {} ({}) cannot batch {}",
                    call.upstream.name,
                    call.upstream.dialect.as_str(),
                    call.path
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
        Body::NotInspected => Decision::Reject(ApiError::bad_request(
            "a deferred call needs a JSON body (Content-Type: application/json)",
            "invalid_content_type",
        )),
        Body::Json { model: None } => Decision::Reject(ApiError::BadRequest {
            message: "a deferred call needs a \"model\" in its body".into(),
            param: Some("model".into()),
            code: "missing_model",
        }),
        Body::Json { model: Some(_) } => Decision::Defer(deferral),
    }
}

fn explicit_mode(headers: &HeaderMap) -> Result<Option<Mode>, ApiError> {
    let Some(value) = headers.get(MODE_HEADER) else {
        return Ok(None);
    };
    let parsed = value.to_str().ok().and_then(Mode::parse);
    match parsed {
        Some(m) => Ok(Some(m)),
        None => Err(ApiError::BadRequest {
            message: "Carpool-Mode must be one of wait, async, now".into(),
            param: Some("Carpool-Mode".into()),
            code: "invalid_header",
        }),
    }
}

/// Whether `Prefer` (RFC 7240, possibly repeated) contains `respond-async`.
pub fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| {
            pref.split(';')
                .next()
                .is_some_and(|token| token.trim().eq_ignore_ascii_case("respond-async"))
        })
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
        assert!(matches!(d, Decision::Defer(Deferral::Wait)));
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
        assert!(matches!(
            d,
            Decision::Defer(Deferral::Async(AsyncVia::Prefer))
        ));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[("carpool-callback", "https://example.test/hook")],
            CHAT,
            None,
        );
        assert!(matches!(
            d,
            Decision::Defer(Deferral::Async(AsyncVia::Callback))
        ));
    }

    #[test]
    fn defer_prefix_means_wait_but_lets_other_calls_pass() {
        let d = decide(Method::POST, "/defer/v1/chat/completions", &[], CHAT, None);
        assert!(matches!(d, Decision::Defer(Deferral::Wait)));
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
        assert!(matches!(d, Decision::Defer(Deferral::Wait)));
        let d = decide(
            Method::POST,
            "/v1/chat/completions",
            &[],
            CHAT,
            Some("batchy"),
        );
        assert!(matches!(d, Decision::Defer(Deferral::Async(_))));
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
