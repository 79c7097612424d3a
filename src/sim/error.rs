//! The simulator's one error type and its OpenAI-style rendering.
//!
//! Every refusal the simulator produces (bad auth, bad body, unknown id, an
//! injected fault) goes through [`ApiError`], so all of them share the
//! `{"error":{"message","type","param","code"}}` envelope.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// A refusal with the status and the OpenAI-style error fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn missing(param: &str) -> Self {
        Self::invalid(format!("you must provide `{param}`"))
            .code("missing_required_parameter")
            .param(param)
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no {what} with id '{id}'"),
        )
        .code("not_found")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing bearer authentication in the Authorization header",
        )
        .code("invalid_api_key")
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
        .code("file_too_large")
    }

    /// An injected failure with the given status (the `faults` module).
    pub fn injected(status: StatusCode, retry_after: Option<u64>) -> Self {
        let (kind, code) = if status == StatusCode::TOO_MANY_REQUESTS {
            ("rate_limit_error", "rate_limit_exceeded")
        } else if status.is_server_error() {
            ("server_error", "simulated_failure")
        } else {
            ("invalid_request_error", "simulated_failure")
        };
        Self {
            retry_after,
            ..Self::new(
                status,
                kind,
                format!("simulated {} response", status.as_u16()),
            )
            .code(code)
        }
    }

    pub fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// The body every provider error carries.
    pub fn envelope(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.envelope())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
