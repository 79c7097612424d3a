//! Sending one call to an upstream and relaying its answer as a stream.
//!
//! Calls go out through hyper's pooled client (TLS by rustls, HTTP/2 when
//! the upstream offers it); redirects are not followed and bodies are not
//! decompressed, so the caller sees exactly what the upstream sent. Nothing
//! is retried: the client decides. When the environment names an outbound
//! proxy (`HTTPS_PROXY` and friends) calls go through `reqwest`, which
//! honours it, as carpool's batch and files calls do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::headers;
use crate::config::{AuthMode, ServerConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::model::Dialect;
use crate::server::auth::X_API_KEY;
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
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

type HyperClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Body>;

/// The upstream HTTP client: cheap to clone, shares one connection pool.
#[derive(Clone)]
pub struct Forwarder {
    /// For batch, files and health calls, and for forwarding through an
    /// outbound proxy.
    client: reqwest::Client,
    /// For forwarding when no outbound proxy is configured: hyper's client
    /// without reqwest's layers (URL parsing, redirect policy, response
    /// wrapping), about a fifth of the proxy's work per call.
    direct: Option<HyperClient>,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Environment variables that name an outbound proxy (as reqwest reads them).
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Whether the environment names an outbound proxy.
fn proxy_configured(var: impl Fn(&str) -> Option<String>) -> bool {
    PROXY_VARS
        .iter()
        .any(|name| var(name).is_some_and(|v| !v.trim().is_empty()))
}

/// Why an upstream call failed, in the terms both clients share.
enum SendError {
    Connect,
    Timeout,
    Request,
    Broken,
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
        let direct = if proxy_configured(|name| std::env::var(name).ok()) {
            None
        } else {
            Some(direct_client(server)?)
        };
        Ok(Self {
            client,
            direct,
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
                if out.upstream.dialect == Dialect::Anthropic {
                    // Anthropic reads its key from `x-api-key`.
                    let mut key_value =
                        HeaderValue::from_str(key.expose()).map_err(|_| ApiError::Internal {
                            reason: format!(
                                "the key of upstream {} is not a valid header value",
                                out.upstream.name
                            ),
                        })?;
                    key_value.set_sensitive(true);
                    headers.remove(header::AUTHORIZATION);
                    headers.insert(X_API_KEY, key_value);
                } else {
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            // A managed upstream without a key of its own: the caller's key
            // is for carpool and never goes upstream.
            (None, AuthMode::Managed) => {
                headers.remove(header::AUTHORIZATION);
                if out.upstream.dialect == Dialect::Anthropic {
                    headers.remove(X_API_KEY);
                }
            }
            (None, AuthMode::Passthrough) => {}
        }
        let overflow = Arc::new(AtomicBool::new(false));
        let (body, limit) = match out.body {
            OutboundBody::Buffered(bytes) => (Body::from(bytes), 0),
            OutboundBody::Streaming { body, limit } => {
                (limited_body(body, limit, overflow.clone()), limit)
            }
        };
        let url = out.upstream.url_for(out.path_and_query);
        let sent = Instant::now();
        let result = tokio::time::timeout(
            self.request_timeout,
            self.send(out.method, url, headers, body),
        )
        .await;
        let upstream_wait = sent.elapsed();
        let errors = |status: &str| {
            self.metrics
                .upstream_errors
                .with_label_values(&[&out.upstream.name, out.operation, status])
                .inc();
        };
        let (status, upstream_headers, upstream_body) = match result {
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
                let (label, reason) = e.describe();
                errors(label);
                tracing::warn!(upstream = %out.upstream.name, reason, "upstream call failed");
                return Err(match e {
                    SendError::Timeout => ApiError::UpstreamTimeout {
                        upstream: out.upstream.name.clone(),
                        timeout: self.request_timeout,
                    },
                    _ => ApiError::UpstreamUnreachable {
                        upstream: out.upstream.name.clone(),
                        reason,
                    },
                });
            }
            Ok(Ok(r)) => r,
        };
        if status.as_u16() >= 400 {
            errors(status.as_str());
        }
        let mut relayed = Response::new(upstream_body);
        *relayed.status_mut() = status;
        *relayed.headers_mut() = headers::inbound(&upstream_headers);
        Ok(Relayed {
            response: relayed,
            upstream_wait,
        })
    }

    /// Sends one request and returns the upstream's status, headers and
    /// streaming body.
    async fn send(
        &self,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        body: Body,
    ) -> Result<(StatusCode, HeaderMap, Body), SendError> {
        let Some(direct) = &self.direct else {
            let response = self
                .client
                .request(method, url)
                .headers(headers)
                .body(reqwest::Body::wrap_stream(body.into_data_stream()))
                .send()
                .await
                .map_err(|e| SendError::of_reqwest(&e))?;
            let status = response.status();
            let headers = response.headers().clone();
            return Ok((status, headers, Body::from_stream(response.bytes_stream())));
        };
        let uri = Uri::try_from(String::from(url)).map_err(|_| SendError::Request)?;
        let mut request = axum::http::Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = direct.request(request).await.map_err(|e| {
            if e.is_connect() {
                SendError::Connect
            } else {
                SendError::Broken
            }
        })?;
        let (parts, body) = response.into_parts();
        Ok((parts.status, parts.headers, Body::new(body)))
    }
}

/// hyper's pooled client, as the reqwest client is set up: connect timeout,
/// no Nagle, idle connections kept 90 s, HTTP/1.1 or HTTP/2 by ALPN.
fn direct_client(server: &ServerConfig) -> Result<HyperClient, ForwarderError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(server.connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https),
    )
}

impl SendError {
    fn of_reqwest(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::Connect
        } else if e.is_body() || e.is_request() {
            Self::Request
        } else {
            Self::Broken
        }
    }

    /// A metric label and a log reason that name no URL, host or key.
    fn describe(&self) -> (&'static str, &'static str) {
        match self {
            Self::Timeout => ("timeout", "timed out"),
            Self::Connect => ("connect", "connection failed"),
            Self::Request => ("io", "request could not be sent"),
            Self::Broken => ("io", "connection broken"),
        }
    }
}

/// The caller's body, failing (and flagging `overflow`) once it has carried
/// more than `limit` bytes.
fn limited_body(body: Body, limit: u64, overflow: Arc<AtomicBool>) -> Body {
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
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::extract::Request;
    use axum::routing::post;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::config::{from_toml_str, Config};

    #[test]
    fn an_outbound_proxy_in_the_environment_is_noticed() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                set.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!proxy_configured(env(&[])));
        assert!(!proxy_configured(env(&[("HTTPS_PROXY", " ")])));
        assert!(!proxy_configured(env(&[("NO_PROXY", "*")])));
        assert!(proxy_configured(env(&[(
            "https_proxy",
            "http://10.0.0.1:3128"
        )])));
        assert!(proxy_configured(env(&[(
            "ALL_PROXY",
            "socks5://10.0.0.1:1080"
        )])));
    }

    /// An upstream that answers 201 with the body it read, the key it was
    /// sent and the query it saw.
    async fn echo_upstream() -> std::net::SocketAddr {
        let app = axum::Router::new().route(
            "/base/v1/echo",
            post(|request: Request| async move {
                let (parts, body) = request.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let seen = |name: header::HeaderName| {
                    parts
                        .headers
                        .get(name)
                        .map_or_else(|| "-".to_owned(), |v| v.to_str().unwrap_or("?").to_owned())
                };
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header("x-seen-auth", seen(header::AUTHORIZATION))
                    .header("x-seen-host", seen(header::HOST))
                    .header("x-seen-query", parts.uri.query().unwrap_or("-"))
                    .header(header::CONNECTION, "keep-alive")
                    .body(Body::from(body))
                    .unwrap()
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn config(addr: std::net::SocketAddr) -> Config {
        let text = format!(
            "[[upstreams]]\nname = \"u\"\ndialect = \"openai\"\nbase_url = \"http://{addr}/base\"\n\
             api_key_env = \"K\"\nauth = \"managed\"\n"
        );
        let vars = BTreeMap::from([("K".to_owned(), "upstream-key".to_owned())]);
        from_toml_str(&text, &vars).unwrap()
    }

    /// Both ways out (hyper's client, and reqwest's when a proxy is
    /// configured) send the same request and relay the same answer.
    #[tokio::test]
    async fn both_clients_forward_bodies_keys_and_answers_alike() {
        let addr = echo_upstream().await;
        let config = config(addr);
        let metrics = Arc::new(Metrics::new().unwrap());
        let direct = Forwarder::new(&config.server, metrics).unwrap();
        assert!(direct.direct.is_some() || proxy_configured(|n| std::env::var(n).ok()));
        let via_reqwest = Forwarder {
            direct: None,
            ..direct.clone()
        };
        let upstream = &config.upstreams[0];
        let caller = Caller::authenticate(&HeaderMap::new(), upstream, &[]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer caller-key"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("carpool.internal"));
        headers.insert("carpool-mode", HeaderValue::from_static("sync"));
        for forwarder in [&direct, &via_reqwest] {
            for streamed in [false, true] {
                let body = if streamed {
                    OutboundBody::Streaming {
                        body: Body::from("a streamed body"),
                        limit: 1024,
                    }
                } else {
                    OutboundBody::Buffered(Bytes::from_static(b"a streamed body"))
                };
                let relayed = forwarder
                    .forward(Outbound {
                        upstream,
                        caller: &caller,
                        method: Method::POST,
                        path_and_query: "/v1/echo?x=1",
                        headers: &headers,
                        body,
                        operation: "passthrough",
                    })
                    .await
                    .unwrap();
                let response = relayed.response;
                assert_eq!(response.status(), StatusCode::CREATED);
                let h = response.headers();
                assert_eq!(h["x-seen-auth"], "Bearer upstream-key");
                assert_eq!(h["x-seen-host"], addr.to_string().as_str());
                assert_eq!(h["x-seen-query"], "x=1");
                assert!(h.get(header::CONNECTION).is_none(), "hop-by-hop relayed");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"a streamed body");
            }
            let over = forwarder
                .forward(Outbound {
                    upstream,
                    caller: &caller,
                    method: Method::POST,
                    path_and_query: "/v1/echo",
                    headers: &headers,
                    body: OutboundBody::Streaming {
                        body: Body::from("more than eight bytes"),
                        limit: 8,
                    },
                    operation: "passthrough",
                })
                .await;
            assert!(matches!(over, Err(ApiError::PayloadTooLarge { limit: 8 })));
        }
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_connections_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = config(addr);
        let metrics = Arc::new(Metrics::new().unwrap());
        let forwarder = Forwarder::new(&config.server, metrics.clone()).unwrap();
        let upstream = &config.upstreams[0];
        let caller = Caller::authenticate(&HeaderMap::new(), upstream, &[]).unwrap();
        let result = forwarder
            .forward(Outbound {
                upstream,
                caller: &caller,
                method: Method::POST,
                path_and_query: "/v1/echo",
                headers: &HeaderMap::new(),
                body: OutboundBody::Buffered(Bytes::new()),
                operation: "passthrough",
            })
            .await;
        assert!(matches!(result, Err(ApiError::UpstreamUnreachable { .. })));
        let refused = metrics
            .upstream_errors
            .with_label_values(&["u", "passthrough", "connect"])
            .get();
        assert_eq!(refused, 1);
    }
}
