//! Sending one call to an upstream and relaying its answer as a stream.
//!
//! One pooled `reqwest::Client` for every upstream; redirects are not
//! followed and bodies are not decompressed, so the caller sees exactly what
//! the upstream sent. Nothing is retried: the client decides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use super::headers;
use crate::config::{AuthMode, ServerConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::server::{ApiError, Caller};

/// A request body on its way upstream.
pub enum OutboundBody {
    /// Already in memory (a JSON call read for routing, or a deferred call's
    /// realtime fallback).
    Buffered(Bytes),
    /// Streamed from the caller as it arrives; cut off above `limit` bytes.
    Streaming { body: Body, limit: u64 },
}

/// One call to forward.
pub struct Outbound<'a> {
    pub upstream: &'a UpstreamConfig,
    pub caller: &'a Caller,
    pub method: Method,
    /// Path and query as the upstream should see them, e.g. `/v1/models?x=1`.
    pub path_and_query: &'a str,
    /// The caller's headers; hop-by-hop ones are dropped here.
    pub headers: &'a HeaderMap,
    pub body: OutboundBody,
    /// Metric label for upstream errors, e.g. `passthrough`.
    pub operation: &'static str,
}

/// The upstream's answer, body still streaming.
pub struct Relayed {
    pub response: Response<Body>,
    /// Time from sending the request to receiving the response headers.
    pub upstream_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The upstream HTTP client: cheap to clone, shares one connection pool.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
struct BodyTooLarge;

impl Forwarder {
    pub fn new(server: &ServerConfig, metrics: Arc<Metrics>) -> Result<Self, ForwarderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(server.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            client,
            request_timeout: server.request_timeout,
            metrics,
        })
    }

    /// The shared client, for other upstream calls (health checks, batch APIs).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends one already-buffered JSON call realtime, as a `POST` to `path`
    /// (e.g. `/v1/chat/completions`): the deferral's realtime fallback.
    /// `headers` are the caller's original headers (hop-by-hop ones dropped).
    pub async fn forward_json(
        &self,
        upstream: &UpstreamConfig,
        caller: &Caller,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        operation: &'static str,
    ) -> Result<Relayed, ApiError> {
        let mut headers = headers.clone();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.remove(header::CONTENT_LENGTH);
        self.forward(Outbound {
            upstream,
            caller,
            method: Method::POST,
            path_and_query: path,
            headers: &headers,
            body: OutboundBody::Buffered(body),
            operation,
        })
        .await
    }

    /// Sends `out` and returns the upstream's status, end-to-end headers and
    /// streaming body untouched. Errors are carpool's own: 413, 502, 504.
    pub async fn forward(&self, out: Outbound<'_>) -> Result<Relayed, ApiError> {
        let mut headers = headers::outbound(out.headers);
        match (&out.caller.upstream_key, out.upstream.auth) {
            (Some(key), _) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                    .map_err(|_| ApiError::Internal {
                        reason: format!(
                            "the key of upstream {} is not a valid header value",
                            out.upstream.name
                        ),
                    })?;
                value.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, value);
            }
            // A managed upstream without a key of its own: the caller's key
            // is for carpool and never goes upstream.
            (None, AuthMode::Managed) => {
                headers.remove(header::AUTHORIZATION);
            }
            (None, AuthMode::Passthrough) => {}
        }
        let overflow = Arc::new(AtomicBool::new(false));
        let (body, limit) = match out.body {
            OutboundBody::Buffered(bytes) => (reqwest::Body::from(bytes), 0),
            OutboundBody::Streaming { body, limit } => {
                (limited_stream(body, limit, overflow.clone()), limit)
            }
        };
        let url = out.upstream.url_for(out.path_and_query);
        let request = self
            .client
            .request(out.method, url)
            .headers(headers)
            .body(body);
        let sent = Instant::now();
        let result = tokio::time::timeout(self.request_timeout, request.send()).await;
        let upstream_wait = sent.elapsed();
        let errors = |status: &str| {
            self.metrics
                .upstream_errors
                .with_label_values(&[&out.upstream.name, out.operation, status])
                .inc();
        };
        let response = match result {
            Err(_elapsed) => {
                errors("timeout");
                return Err(ApiError::UpstreamTimeout {
                    upstream: out.upstream.name.clone(),
                    timeout: self.request_timeout,
                });
            }
            Ok(Err(_)) if overflow.load(Ordering::Relaxed) => {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            Ok(Err(e)) => {
                let (label, reason) = classify_error(&e);
                errors(label);
                tracing::warn!(upstream = %out.upstream.name, reason, "upstream call failed");
                return Err(if e.is_timeout() {
                    ApiError::UpstreamTimeout {
                        upstream: out.upstream.name.clone(),
                        timeout: self.request_timeout,
                    }
                } else {
                    ApiError::UpstreamUnreachable {
                        upstream: out.upstream.name.clone(),
                        reason,
                    }
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.as_u16() >= 400 {
            errors(status.as_str());
        }
        let relayed_headers = headers::inbound(response.headers());
        let mut relayed = Response::new(Body::from_stream(response.bytes_stream()));
        *relayed.status_mut() = status;
        *relayed.headers_mut() = relayed_headers;
        Ok(Relayed {
            response: relayed,
            upstream_wait,
        })
    }
}

/// A metric label and a log reason that name no URL, host or key.
fn classify_error(e: &reqwest::Error) -> (&'static str, &'static str) {
    if e.is_timeout() {
        ("timeout", "timed out")
    } else if e.is_connect() {
        ("connect", "connection failed")
    } else if e.is_body() || e.is_request() {
        ("io", "request could not be sent")
    } else {
        ("io", "connection broken")
    }
}

/// The caller's body as a stream that fails (and flags `overflow`) once it
/// has carried more than `limit` bytes.
fn limited_stream(body: Body, limit: u64, overflow: Arc<AtomicBool>) -> reqwest::Body {
    let mut seen: u64 = 0;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk =
            chunk.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
        seen = seen.saturating_add(chunk.len() as u64);
        if seen > limit {
            overflow.store(true, Ordering::Relaxed);
            return Err(Box::new(BodyTooLarge) as Box<dyn std::error::Error + Send + Sync>);
        }
        Ok(chunk)
    });
    reqwest::Body::wrap_stream(stream)
}
