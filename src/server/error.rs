//! Errors at the HTTP edge, rendered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds the client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or a value is invalid.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut error = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        error.param = param.map(str::to_string);
        error
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist; GET /v1/models lists the served models."),
        );
        error.param = Some("model".into());
        error.code = Some("model_not_found");
        error
    }

    /// 404 for a named resource other than a model.
    pub fn not_found(message: impl Into<String>, param: &str, code: &'static str) -> Self {
        let mut error = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        error.param = Some(param.into());
        error.code = Some(code);
        error
    }

    /// 401 for a missing or unknown client key. The response also carries
    /// `WWW-Authenticate: Bearer`, as RFC 6750 requires.
    pub fn unauthorized(message: impl Into<String>, code: &'static str) -> Self {
        let mut error = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message);
        error.code = Some(code);
        error
    }

    pub fn unsupported_media_type(found: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Content-Type must be application/json, got `{found}`."),
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body exceeds the limit of {limit} bytes."),
        )
    }

    pub fn overloaded(message: impl Into<String>, retry_after: u64) -> Self {
        let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        error.code = Some("queue_full");
        error.retry_after = Some(retry_after);
        error
    }

    pub fn loading() -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The models are still loading; retry shortly.",
        );
        error.code = Some("model_loading");
        error.retry_after = Some(1);
        error
    }

    /// 502: a remote provider failed, or returned a response that cannot be used.
    pub fn bad_gateway(message: impl Into<String>, code: &'static str) -> Self {
        let mut error = Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message);
        error.code = Some(code);
        error
    }

    /// 500 with a fixed message; the cause goes to the log only, so internals do not leak.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server failed to process the request; its log has the details.",
        )
    }

    pub fn body(&self) -> serde_json::Value {
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

/// An invalid routing criterion is a 400 that names the header or body field.
impl From<crate::routing::criteria::CriteriaError> for ApiError {
    fn from(error: crate::routing::criteria::CriteriaError) -> Self {
        Self::invalid_request(error.message, Some(&error.param))
    }
}

/// The message of an error response, kept in its extensions for the audit record.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_client_error() {
            // Messages quote client input, so control characters are escaped to keep a client
            // from writing lines of its own into the log.
            tracing::info!(status = self.status.as_u16(), message = %self.message.escape_debug(), "request rejected");
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorMessage(self.message));
        response
    }
}
