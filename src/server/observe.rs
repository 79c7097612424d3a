//! One middleware around every call: gives it an id, records
//! `carpool_requests_total`, and writes one log line when the response
//! headers go out. Handlers report what they know (mode, upstream) through
//! response extensions; raw paths never become metric labels, only the
//! route templates below.

use std::sync::Arc;

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use tracing::Instrument;

use super::error::{Blame, ProducedByCarpool};
use crate::app::AppState;

/// When the call arrived (request extension).
#[derive(Clone, Copy, Debug)]
pub struct RequestStart(pub Instant);

/// The bounded route template of the call (request extension).
#[derive(Clone, Copy, Debug)]
pub struct RouteLabel(pub &'static str);

/// How the call was served: `passthrough`, `wait`, `async`… (response
/// extension; carpool's own endpoints are `local`).
#[derive(Clone, Copy, Debug)]
pub struct ModeLabel(pub &'static str);

/// The upstream that served the call (response extension).
#[derive(Clone, Debug)]
pub struct UpstreamLabel(pub String);

/// The templates calls are counted under; anything else is `other`.
const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fim/completions",
    "/v1/moderations",
    "/v1/chat/moderations",
    "/v1/ocr",
    "/v1/classifications",
    "/v1/chat/classifications",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/batches",
    "/v1/messages/batches/{id}",
    "/v1/messages/batches/{id}/cancel",
    "/v1/messages/batches/{id}/results",
    "/v1/models",
    "/v1/models/{id}",
    "/v1/files",
    "/v1/files/{id}",
    "/v1/files/{id}/content",
    "/v1/batches",
    "/v1/batches/{id}",
    "/v1/batches/{id}/cancel",
    "/v1/batch/jobs",
    "/v1/batch/jobs/{id}",
    "/v1/batch/jobs/{id}/cancel",
    "/v1/carpool/requests",
    "/v1/carpool/requests/{id}",
    "/v1/carpool/requests/{id}/result",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// The template `path` matches (`{id}` matches one segment), `/admin` for
/// the admin API, else `other`.
pub fn route_template(path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    if path.split('/').nth(1) == Some("admin") {
        return "/admin";
    }
    ROUTES
        .iter()
        .find(|t| matches_template(t, path))
        .copied()
        .unwrap_or("other")
}

/// Segment by segment, without allocating: this runs on every call.
fn matches_template(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some("{id}"), Some(s)) if !s.is_empty() => {}
            (Some(t), Some(s)) if t == s => {}
            _ => return false,
        }
    }
}

fn outcome(response: &Response) -> &'static str {
    match response.extensions().get::<ProducedByCarpool>() {
        Some(ProducedByCarpool(Blame::Client)) => "rejected",
        Some(ProducedByCarpool(Blame::Upstream)) => "upstream_failed",
        Some(ProducedByCarpool(Blame::Internal)) => "error",
        None => match response.status().as_u16() {
            0..=399 => "ok",
            400..=499 => "client_error",
            _ => "server_error",
        },
    }
}

pub async fn observe(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let id = format!("{:016x}", rand::thread_rng().gen::<u64>());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (target, _) = crate::proxy::strip_defer_prefix(&path, &state.config.server.defer_prefix);
    let route = route_template(target);
    let anthropic = super::error::anthropic_caller(target, request.headers());
    request.extensions_mut().insert(RequestStart(start));
    request.extensions_mut().insert(RouteLabel(route));

    let span = tracing::info_span!("request", id = %id);
    let mut response = next.run(request).instrument(span.clone()).await;
    if anthropic {
        response = super::error::in_anthropic_shape(response).await;
    }

    let mode = response
        .extensions()
        .get::<ModeLabel>()
        .map_or("local", |m| m.0);
    let outcome = outcome(&response);
    state
        .metrics
        .requests
        .with_label_values(&[route, mode, outcome])
        .inc();
    let upstream = response
        .extensions()
        .get::<UpstreamLabel>()
        .map(|u| u.0.as_str())
        .unwrap_or("");
    let status = response.status().as_u16();
    let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    span.in_scope(|| {
        if mode == "local" && outcome == "ok" {
            tracing::debug!(%method, %path, status, micros, "request");
        } else {
            tracing::info!(%method, %path, route, mode, upstream, status, outcome, micros, "request");
        }
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_bounded_templates() {
        assert_eq!(
            route_template("/v1/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            route_template("/v1/files/file-abc/content"),
            "/v1/files/{id}/content"
        );
        assert_eq!(
            route_template("/v1/batch/jobs/123/cancel"),
            "/v1/batch/jobs/{id}/cancel"
        );
        assert_eq!(route_template("/admin/windows/x"), "/admin");
        assert_eq!(route_template("/v1/whatever/else"), "other");
        assert_eq!(route_template("/v1/files//content"), "other");
    }
}
