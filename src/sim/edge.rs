//! The edge every `/v1` call passes: faults, latency, bearer auth, and the
//! call log. Control routes (`/_sim/...`) bypass it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::body::{Body, BodyDataStream};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use super::error::ApiError;
use super::state::{lock, CallIds, CallRecord, Sim};

/// Marks a response the server must replace by closing the connection.
#[derive(Clone, Copy, Debug)]
pub struct DropConnection;

/// The bearer token of a request, if it carries a non-empty one, else
/// its non-empty `x-api-key` (Anthropic's).
pub fn credential(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
        });
    bearer.or_else(|| {
        let key = headers.get("x-api-key")?.to_str().ok()?.trim();
        (!key.is_empty()).then(|| key.to_owned())
    })
}

/// Whether `path` is one of Anthropic's, whose errors take its shape.
fn anthropic_route(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

pub async fn edge(State(sim): State<Arc<Sim>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let credential = credential(req.headers());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(name, _)| *name != header::AUTHORIZATION && name.as_str() != "x-api-key")
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let verdict = lock(&sim.faults).on_call(&method, &template, &path);
    let (latency, record) = {
        let opts = sim.options.read().unwrap_or_else(PoisonError::into_inner);
        (opts.latency, opts.record_calls)
    };
    let wait = latency + verdict.extra_latency;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let mut handled = false;
    let response = if verdict.drop_connection {
        let mut r = StatusCode::BAD_GATEWAY.into_response();
        r.extensions_mut().insert(DropConnection);
        r
    } else if let Some((status, retry_after)) = verdict.error {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = ApiError::injected(status, retry_after);
        let mut r = match &verdict.error_code {
            _ if anthropic_route(&path) => {
                let mut body = super::anthropic::envelope(&error);
                if let Some(code) = &verdict.error_code {
                    body["error"]["type"] = code.clone().into();
                }
                let mut r = (status, axum::Json(body)).into_response();
                if let Some(secs) = retry_after {
                    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                        r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
                    }
                }
                r
            }
            Some(code) => {
                let mut body = error.envelope();
                body["error"]["type"] = code.clone().into();
                body["error"]["code"] = code.clone().into();
                (status, axum::Json(body)).into_response()
            }
            None => error.into_response(),
        };
        if let Some(raw) = &verdict.error_retry_after_raw {
            if let Ok(value) = axum::http::HeaderValue::from_str(raw) {
                r.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, value);
            }
        }
        r
    } else if credential.is_none() && anthropic_route(&path) {
        super::anthropic::AnthropicError(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        ))
        .into_response()
    } else if credential.is_none() {
        ApiError::unauthorized().into_response()
    } else {
        handled = true;
        next.run(req).await
    };
    if record {
        let ids = response
            .extensions()
            .get::<CallIds>()
            .cloned()
            .unwrap_or_default();
        let status = if response.extensions().get::<DropConnection>().is_some() {
            0
        } else {
            response.status().as_u16()
        };
        lock(&sim.calls).push(CallRecord {
            job_id: ids
                .job_id
                .or_else(|| path_param(&template, &path, &["{job_id}", "{batch_id}"])),
            file_id: ids
                .file_id
                .or_else(|| path_param(&template, &path, &["{file_id}"])),
            method,
            route: template,
            path,
            credential,
            status,
            headers,
        });
    }
    let response = match verdict.pad_line {
        Some((line, bytes)) if handled => pad_line(response, line, bytes).await,
        _ => response,
    };
    if handled && verdict.hold_response {
        match verdict.hold_after_lines {
            Some(lines) => {
                return response.map(|body| hold_after_lines(body, lines, Arc::clone(&sim)));
            }
            None => hold(&sim).await,
        }
    }
    response
}

/// `response` with `bytes` spaces before the end of its `line`-th line
/// (sim bodies are small, so it is read whole).
async fn pad_line(response: Response, line: u64, bytes: u64) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(data) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let end = data
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .nth(usize::try_from(line.saturating_sub(1)).unwrap_or(usize::MAX))
        .unwrap_or(data.len());
    let pad = usize::try_from(bytes).unwrap_or(0);
    let mut out = Vec::with_capacity(data.len() + pad);
    out.extend_from_slice(&data[..end]);
    out.resize(end + pad, b' ');
    out.extend_from_slice(&data[end..]);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

/// The body up to and including its `lines`-th newline, then a hold, then
/// the rest.
fn hold_after_lines(body: Body, lines: u64, sim: Arc<Sim>) -> Body {
    struct Cut {
        inner: BodyDataStream,
        left: u64,
        held: bool,
        rest: Option<Bytes>,
        sim: Arc<Sim>,
    }
    let start = Cut {
        inner: body.into_data_stream(),
        left: lines,
        held: false,
        rest: None,
        sim,
    };
    Body::from_stream(futures_util::stream::unfold(start, |mut s| async move {
        if !s.held && s.left == 0 {
            hold(&s.sim).await;
            s.held = true;
        }
        if let Some(rest) = s.rest.take().filter(|r| !r.is_empty()) {
            return Some((Ok(rest), s));
        }
        let chunk = match s.inner.next().await? {
            Ok(chunk) => chunk,
            Err(err) => return Some((Err(err), s)),
        };
        if s.held {
            return Some((Ok(chunk), s));
        }
        let mut cut = None;
        for (i, _) in chunk.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            s.left -= 1;
            if s.left == 0 {
                cut = Some(i + 1);
                break;
            }
        }
        match cut {
            Some(at) => {
                s.rest = Some(chunk.slice(at..));
                Some((Ok(chunk.slice(..at)), s))
            }
            None => Some((Ok(chunk), s)),
        }
    }))
}

/// Waits until held responses are released. The call is counted in
/// `sim.held` meanwhile, also when its connection goes away first.
async fn hold(sim: &Sim) {
    struct Held<'a>(&'a Sim);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let mut release = sim.release.subscribe();
    sim.held.fetch_add(1, Ordering::SeqCst);
    let _held = Held(sim);
    // The sender lives as long as the simulator.
    let _ = release.changed().await;
}

/// The path segment standing where the template has one of `names`.
fn path_param(template: &str, path: &str, names: &[&str]) -> Option<String> {
    template
        .split('/')
        .zip(path.split('/'))
        .find(|(t, _)| names.contains(t))
        .map(|(_, p)| p.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn credential_needs_a_non_empty_bearer_token() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(credential(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(credential(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        assert_eq!(credential(&h), Some("sk-1".to_owned()));
    }

    #[test]
    fn path_param_reads_the_named_segment() {
        assert_eq!(
            path_param(
                "/v1/files/{file_id}/content",
                "/v1/files/f1/content",
                &["{file_id}"]
            ),
            Some("f1".to_owned())
        );
        assert_eq!(path_param("/v1/files", "/v1/files", &["{file_id}"]), None);
    }
}
