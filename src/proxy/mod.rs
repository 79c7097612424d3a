//! Pass-through forwarding, and the decision that sends a call down the
//! deferred path instead. Owns: reading a call just enough to route it,
//! choosing the upstream, the defer / pass / reject decision, and relaying
//! to the upstream with streams intact. Does not own: deferral itself
//! (`crate::deferral`), authentication rules (`crate::server::auth`), or how
//! errors look on the wire (`crate::server::error`).
//!
//! A pass-through call: inspect body → route by model → authenticate →
//! classify → forward → relay the upstream's answer as a stream.

pub mod classify;
pub mod forward;
pub mod headers;
pub mod health;
pub mod inspect;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use axum::response::{IntoResponse, Response};

pub use classify::{classify, Answer, Decision};
pub use forward::{Forwarder, Outbound, OutboundBody, Relayed};
use inspect::Inspected;

use crate::app::AppState;
use crate::deferral::intake::{Held, Intake};
use crate::server::observe::{ModeLabel, RequestStart, RouteLabel, UpstreamLabel};
use crate::server::{ApiError, Caller};

/// The path a call targets upstream, with the defer prefix removed, and
/// whether the prefix was there. `prefix` is e.g. `/defer` (`""`: disabled).
pub fn strip_defer_prefix<'p>(path: &'p str, prefix: &str) -> (&'p str, bool) {
    if prefix.is_empty() {
        return (path, false);
    }
    match path.strip_prefix(prefix) {
        Some("") => ("/", true),
        Some(rest) if rest.starts_with('/') => (rest, true),
        _ => (path, false),
    }
}

/// The fallback handler: everything not served by carpool itself.
///
/// Routing, intake and forwarding run in a boxed future that ends, taking
/// the request with it, before a held caller starts to wait: a connection
/// holding a wait-mode call keeps only [`Held`] and this small frame.
pub async fn handle(state: Arc<AppState>, request: Request<Body>) -> Response {
    let routed = Box::pin(pass_through(&state, request)).await;
    let answered = match routed {
        Ok(Routed::Now(response)) => Ok(response),
        Ok(Routed::Held(held)) => {
            let upstream = UpstreamLabel(held.upstream().to_owned());
            // Boxed too: this frame, which every connection carries, then
            // holds a pointer rather than room for the largest future.
            Box::pin((*held).answer(&state.deferral))
                .await
                .map(|mut response| {
                    response.extensions_mut().insert(ModeLabel("deferred"));
                    response.extensions_mut().insert(upstream);
                    response
                })
        }
        Err(err) => Err(err),
    };
    match answered {
        Ok(response) => response,
        Err(err) => {
            let mut response = err.into_response();
            response.extensions_mut().insert(ModeLabel("passthrough"));
            response
        }
    }
}

/// A call routed: answered, or stored and now waiting for its result.
enum Routed {
    Now(Response),
    Held(Box<Held>),
}

async fn pass_through(state: &AppState, request: Request<Body>) -> Result<Routed, ApiError> {
    let config = &state.config;
    let (parts, body) = request.into_parts();
    let start = parts
        .extensions
        .get::<RequestStart>()
        .map_or_else(Instant::now, |s| s.0);
    let route = parts
        .extensions
        .get::<RouteLabel>()
        .map_or("other", |r| r.0);

    // Before the body: a caller no upstream would accept is refused without
    // reading it. The routed upstream's own check follows once the model is known.
    Caller::admissible(&parts.headers, &config.upstreams, &config.clients)?;
    let inspected = inspect::inspect(&parts.headers, body, config.server.max_body).await?;
    let model = match &inspected {
        Inspected::Json { model, .. } => model.as_deref(),
        _ => None,
    };
    let upstream = config.route(model);
    let caller = Caller::authenticate(&parts.headers, upstream, &config.clients)?;

    let (path, via_defer_prefix) =
        strip_defer_prefix(parts.uri.path(), &config.server.defer_prefix);
    let call = classify::Call {
        method: &parts.method,
        path,
        via_defer_prefix,
        headers: &parts.headers,
        body: match &inspected {
            Inspected::Json { model, .. } => classify::Body::Json {
                model: model.as_deref(),
            },
            Inspected::Malformed {
                mistyped: Some(field),
                ..
            } => classify::Body::Mistyped(*field),
            Inspected::Malformed { mistyped: None, .. } => classify::Body::Malformed,
            Inspected::Stream(_) => classify::Body::NotInspected,
        },
        client: caller.client_name.as_deref(),
        upstream,
    };
    match classify(&call, config) {
        Decision::Reject(err) => return Err(err),
        Decision::Pass => {}
        Decision::Defer(answer) => {
            let Inspected::Json {
                bytes,
                model: Some(model),
                stream,
            } = inspected
            else {
                // classify defers only JSON bodies that name a model.
                return Err(ApiError::Internal {
                    reason: "deferral without a JSON body".to_owned(),
                });
            };
            let intake = crate::deferral::intake::defer(
                &state.deferral,
                crate::deferral::intake::Deferred {
                    caller: &caller,
                    upstream,
                    endpoint: path,
                    model,
                    stream,
                    headers: &parts.headers,
                    body: bytes,
                    answer,
                },
            )
            .await?;
            let mut response = match intake {
                Intake::Answered(response) => response,
                Intake::Held(held) => return Ok(Routed::Held(held)),
            };
            response.extensions_mut().insert(ModeLabel("deferred"));
            response
                .extensions_mut()
                .insert(UpstreamLabel(upstream.name.clone()));
            return Ok(Routed::Now(response));
        }
    }

    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let body = match inspected {
        Inspected::Json { bytes, .. } | Inspected::Malformed { bytes, .. } => {
            OutboundBody::Buffered(bytes)
        }
        Inspected::Stream(body) => OutboundBody::Streaming {
            body,
            limit: config.server.max_body,
        },
    };
    let relayed = state
        .forwarder
        .forward(Outbound {
            upstream,
            caller: &caller,
            method: parts.method.clone(),
            path_and_query: &path_and_query,
            headers: &parts.headers,
            body,
            operation: "passthrough",
        })
        .await?;

    let total = start.elapsed();
    let metrics = &state.metrics;
    metrics
        .passthrough_duration
        .with_label_values(&[route, &upstream.name])
        .observe(total.as_secs_f64());
    metrics
        .proxy_overhead
        .with_label_values(&[route])
        .observe(total.saturating_sub(relayed.upstream_wait).as_secs_f64());
    let mut response = relayed.response;
    response.extensions_mut().insert(ModeLabel("passthrough"));
    response
        .extensions_mut()
        .insert(UpstreamLabel(upstream.name.clone()));
    Ok(Routed::Now(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_defer_prefix_only_at_a_segment_boundary() {
        assert_eq!(
            strip_defer_prefix("/defer/v1/chat/completions", "/defer"),
            ("/v1/chat/completions", true)
        );
        assert_eq!(
            strip_defer_prefix("/deferred/v1", "/defer"),
            ("/deferred/v1", false)
        );
        assert_eq!(
            strip_defer_prefix("/v1/models", "/defer"),
            ("/v1/models", false)
        );
        assert_eq!(
            strip_defer_prefix("/defer/v1/x", ""),
            ("/defer/v1/x", false)
        );
    }
}
