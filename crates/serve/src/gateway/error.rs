//! OpenAI error objects with the HTTP status that goes with each failure.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::protocol::code;

/// An error answered to an API client: `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, …
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    /// 400: `field` is wrong, and why.
    pub fn bad_field(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let field = field.into();
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("{field}: {message}"),
        )
        .with_code("invalid_value");
        e.param = Some(field);
        e
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message).with_code("invalid_api_key")
    }

    /// 404 for a model no worker has ever served.
    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        let list = if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        };
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist. Available models: {list}"),
        )
        .with_code("model_not_found");
        e.param = Some("model".into());
        e
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 429 with Retry-After.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "server_overloaded", message).with_code("overloaded");
        e.retry_after = Some(1);
        e
    }

    /// 503 with Retry-After.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e =
            Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message).with_code("no_worker_available");
        e.retry_after = Some(2);
        e
    }

    /// 502: a worker failed while answering.
    pub fn worker_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", message).with_code("worker_failed")
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).with_code("internal_error")
    }

    /// An error a worker reported with a FastChat code.
    pub fn from_worker(worker_code: i64, reason: &str) -> Self {
        match worker_code {
            code::CONTEXT_OVERFLOW => {
                let mut e = Self::bad_request(reason).with_code("context_length_exceeded");
                e.param = Some("messages".into());
                e
            }
            40000..=40099 | code::PARAM_OUT_OF_RANGE => Self::bad_request(reason).with_code("invalid_value"),
            code::INVALID_MODEL => Self::bad_request(reason).with_code("model_not_found"),
            42900..=42999 => Self::overloaded(reason),
            code::CONTROLLER_NO_WORKER => Self::unavailable(reason),
            code::CONTROLLER_WORKER_TIMEOUT => Self::worker_failed(reason),
            _ => Self::worker_failed(format!("the worker failed (code {worker_code}): {reason}")),
        }
    }

    /// The body, for an SSE error event or a JSON response.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
        }
        r
    }
}
