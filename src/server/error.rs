//! The one place an error becomes an HTTP status and an OpenAI-style body,
//! `{"error":{"message","type","param","code"}}`. Other layers define their
//! own error enums and convert into [`ApiError`]; handlers return it. On
//! Anthropic's routes the same errors take Anthropic's shape
//! ([`in_anthropic_shape`]).

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Who is to blame for an error, as data (for logs and metric outcomes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing `model`, a bad carpool header.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{message}")]
    Conflict { message: String },
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// A deferral the upstream cannot batch, or an idempotency key reused
    /// with a different body.
    #[error("{message}")]
    Unprocessable { message: String, code: &'static str },
    /// An intake ceiling is reached; `code` names its config key.
    #[error("carpool is at capacity ({code} is reached), retry in {} s", retry_after.as_secs().max(1))]
    TooManyRequests {
        retry_after: Duration,
        code: &'static str,
    },
    #[error("upstream {upstream} is unreachable: {reason}")]
    UpstreamUnreachable {
        upstream: String,
        reason: &'static str,
    },
    #[error("upstream {upstream} did not answer within {}", humantime::format_duration(*timeout))]
    UpstreamTimeout { upstream: String, timeout: Duration },
    /// The upstream answered, but not usefully (e.g. a batch job failed);
    /// `message` carries the provider's reason.
    #[error("upstream {upstream} failed: {message}")]
    UpstreamFailed { upstream: String, message: String },
    #[error("service is shutting down")]
    ShuttingDown,
    #[error("internal error")]
    Internal { reason: String },
}

/// Marks a response as produced by carpool rather than relayed from an
/// upstream, so request metrics can tell the two apart.
#[derive(Clone, Copy, Debug)]
pub struct ProducedByCarpool(pub Blame);

impl ApiError {
    pub fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: None,
            code,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnreachable { .. } | Self::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamFailed { .. } => Blame::Upstream,
            Self::ShuttingDown | Self::Internal { .. } => Blame::Internal,
            _ => Blame::Client,
        }
    }

    /// Whether the same call may succeed if the client tries again.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::TooManyRequests { .. }
                | Self::UpstreamUnreachable { .. }
                | Self::UpstreamTimeout { .. }
                | Self::ShuttingDown
        )
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Unauthorized => "authentication_error",
            Self::TooManyRequests { .. } => "rate_limit_error",
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamFailed { .. } => "upstream_error",
            Self::ShuttingDown | Self::Internal { .. } => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::TooManyRequests { code, .. } => code,
            Self::Unauthorized => "invalid_api_key",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::PayloadTooLarge { .. } => "body_too_large",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamFailed { .. } => "upstream_failed",
            Self::ShuttingDown => "shutting_down",
            Self::Internal { .. } => "internal_error",
        }
    }
}

impl From<crate::deferral::optin::OptInError> for ApiError {
    fn from(e: crate::deferral::optin::OptInError) -> Self {
        use crate::deferral::optin::OptInError;
        let param = match &e {
            OptInError::UnknownMode(_) => "Carpool-Mode",
            OptInError::BadDeadline(_) | OptInError::DeadlineInPast(_) => "Carpool-Deadline",
            OptInError::NotText(name) => name,
        };
        Self::BadRequest {
            message: e.to_string(),
            param: Some(param.to_owned()),
            code: "invalid_header",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let param = match &self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        if let Self::Internal { reason } = &self {
            tracing::error!(%reason, "internal error");
        }
        let body = json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": param,
                "code": self.code(),
            }
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Self::TooManyRequests { retry_after, .. } = &self {
            let secs = retry_after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
            .extensions_mut()
            .insert(ProducedByCarpool(self.blame()));
        response
    }
}

/// Whether a call's errors take Anthropic's shape (SPEC section 1): its
/// route (the defer prefix already removed) is Anthropic's, or it is a
/// handle call that presents `x-api-key` rather than `Authorization`.
pub fn anthropic_caller(path: &str, headers: &axum::http::HeaderMap) -> bool {
    path == "/v1/messages"
        || path.starts_with("/v1/messages/")
        || (path.starts_with("/v1/carpool/")
            && headers.contains_key("x-api-key")
            && !headers.contains_key(header::AUTHORIZATION))
}

/// Largest error body [`in_anthropic_shape`] rewrites; carpool's are tiny.
const REWRITTEN_MAX: usize = 64 * 1024;

/// An error carpool made, `{"error":{"message","type",…}}`, as Anthropic's
/// `{"type":"error","error":{"type","message"}}`, the type following the
/// status. Only errors of carpool's own (its refusals, and the answers it
/// makes for deferred requests) are touched: an upstream's answer, already
/// in Anthropic's shape, passes as it is.
pub async fn in_anthropic_shape(response: Response) -> Response {
    let status = response.status();
    let ours = response.extensions().get::<ProducedByCarpool>().is_some()
        || response.headers().contains_key("carpool-request-id");
    if !ours || status.as_u16() < 400 {
        return response;
    }
    // Only a body known to be small is read: a larger one (or a stream)
    // is not one of carpool's errors, and goes out untouched.
    let small = axum::body::HttpBody::size_hint(response.body())
        .upper()
        .is_some_and(|n| n <= REWRITTEN_MAX as u64);
    if !small {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, REWRITTEN_MAX).await else {
        return (parts.status, parts.headers).into_response();
    };
    let rewritten = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("error"))
        .and_then(|v| {
            let message = v.pointer("/error/message")?.as_str()?.to_owned();
            let kind = crate::providers::anthropic::error_type_of_status(status.as_u16());
            Some(crate::providers::anthropic::error_body(kind, &message).to_string())
        });
    let body = match rewritten {
        Some(text) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            axum::body::Body::from(text)
        }
        None => axum::body::Body::from(bytes),
    };
    Response::from_parts(parts, body)
}

/// `axum::extract::Query`, refusing a query string that does not parse with
/// an OpenAI-style 400 naming the parameter where axum can tell, instead
/// of axum's plain-text rejection.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => {
                let detail = rejection.body_text();
                // serde_urlencoded names the field as "<name>: <reason>".
                let param = detail
                    .rsplit_once("query string: ")
                    .and_then(|(_, rest)| rest.split_once(':'))
                    .map(|(name, _)| name.trim().to_owned())
                    .filter(|name| {
                        !name.is_empty()
                            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    });
                Err(ApiError::BadRequest {
                    message: detail,
                    param,
                    code: "invalid_query",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(err: ApiError) -> (StatusCode, serde_json::Value, Option<String>) {
        let resp = err.into_response();
        let status = resp.status();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[tokio::test]
    async fn errors_render_as_openai_error_objects() {
        let (status, body, _) = body_of(ApiError::PayloadTooLarge { limit: 10 }).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "body_too_large");
        assert!(body["error"]["param"].is_null());
        assert!(body["error"]["message"].as_str().unwrap().contains("10"));
    }

    #[tokio::test]
    async fn too_many_requests_carries_retry_after() {
        let (status, _, retry) = body_of(ApiError::TooManyRequests {
            retry_after: Duration::from_secs(7),
            code: "max_pending",
        })
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry.as_deref(), Some("7"));
    }

    #[tokio::test]
    async fn errors_on_anthropic_routes_take_anthropic_shape() {
        let resp = in_anthropic_shape(ApiError::Unauthorized.into_response()).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["message"], "invalid or missing API key");
        // An upstream's own answer is not carpool's to rewrite.
        let upstream = (StatusCode::BAD_REQUEST, "{\"error\":{\"message\":\"x\"}}").into_response();
        let bytes = in_anthropic_shape(upstream)
            .await
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&bytes[..], b"{\"error\":{\"message\":\"x\"}}");
        let mut h = axum::http::HeaderMap::new();
        assert!(anthropic_caller("/v1/messages", &h));
        assert!(!anthropic_caller("/v1/carpool/requests", &h));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        assert!(anthropic_caller("/v1/carpool/requests/x", &h));
        assert!(!anthropic_caller("/v1/chat/completions", &h));
    }

    #[test]
    fn upstream_trouble_maps_to_502_and_504() {
        let unreachable = ApiError::UpstreamUnreachable {
            upstream: "u".into(),
            reason: "connection refused",
        };
        let timeout = ApiError::UpstreamTimeout {
            upstream: "u".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(unreachable.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.blame(), Blame::Upstream);
        assert!(timeout.retryable());
    }
}
