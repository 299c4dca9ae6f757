//! Errors of provider clients, and what the provider's error body and headers tell about them.

use std::fmt;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

/// Part of an exchange that a timeout bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// Opening the TCP connection and, for HTTPS, the TLS handshake.
    Connect,
    /// From sending a streaming request to the first byte of the response body.
    FirstByte,
    /// The whole exchange, including every chunk of a stream.
    Total,
}

impl fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::FirstByte => "first byte",
            Self::Total => "total",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{provider}`: environment variable `{var}`, which must hold the API key, is not set or is empty")]
    MissingKey { provider: String, var: String },

    #[error("invalid provider configuration: {0}")]
    InvalidConfig(String),

    #[error("provider `{provider}` has no model `{model}`")]
    UnknownModel { provider: String, model: String },

    #[error("failed to connect to the provider: {source}")]
    Connect {
        #[source]
        source: reqwest::Error,
    },

    /// A failure to send the request or read the response head after connecting, such as a
    /// connection reset.
    #[error("failed to send the request to the provider: {source}")]
    Request {
        #[source]
        source: reqwest::Error,
    },

    #[error("the provider timed out: the {phase} timeout of {limit:?} elapsed")]
    Timeout { phase: TimeoutPhase, limit: Duration },

    /// A response status other than 2xx. `message` comes from the provider's error body when
    /// that is JSON with an `error.message` field, and is the start of the raw body otherwise.
    #[error("the provider returned HTTP {status}: {message}")]
    Status {
        status: StatusCode,
        message: String,
        retry_after: Option<Duration>,
    },

    #[error("malformed response from the provider: {what}")]
    Malformed { what: String },

    /// The body ended, or the connection failed, before the provider's final event.
    #[error("the provider's stream ended before its final event")]
    StreamCut {
        #[source]
        source: Option<reqwest::Error>,
    },

    /// An error event inside a stream that had started. `kind` is the provider's error type,
    /// such as Anthropic's `overloaded_error`.
    #[error("the provider reported an error mid-stream: {message}")]
    Upstream { kind: Option<String>, message: String },
}

/// Error types of transient faults in stream error events: Anthropic's `rate_limit_error`,
/// `api_error` and `overloaded_error` (HTTP 429, 500 and 529 when sent as a status) and
/// OpenAI's `server_error`.
const RETRYABLE_UPSTREAM_KINDS: &[&str] = &["rate_limit_error", "api_error", "overloaded_error", "server_error"];

impl ProviderError {
    /// Returns whether sending the same request again, here or to another provider, may succeed.
    /// That holds for 408, 429, 5xx, timeouts, connection failures, cut streams and transient
    /// error events, but not for configuration faults, other 4xx and malformed responses.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::MissingKey { .. } | Self::InvalidConfig(_) | Self::UnknownModel { .. } => false,
            Self::Connect { .. } | Self::Timeout { .. } | Self::StreamCut { .. } => true,
            Self::Request { source } => !source.is_builder(),
            Self::Status { status, .. } => {
                *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error()
            }
            Self::Malformed { .. } => false,
            Self::Upstream { kind, .. } => kind
                .as_deref()
                .is_some_and(|kind| RETRYABLE_UPSTREAM_KINDS.contains(&kind)),
        }
    }

    /// Returns the wait before a retry that the provider requested, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(super) fn malformed(what: impl Into<String>) -> Self {
        Self::Malformed { what: what.into() }
    }

    /// Classifies an error of `RequestBuilder::send`.
    pub(super) fn from_send(source: reqwest::Error, connect_timeout: Duration) -> Self {
        if source.is_connect() && source.is_timeout() {
            Self::Timeout {
                phase: TimeoutPhase::Connect,
                limit: connect_timeout,
            }
        } else if source.is_connect() {
            Self::Connect { source }
        } else {
            Self::Request { source }
        }
    }
}

/// Maximum number of characters of a non-JSON error body kept in `ProviderError::Status::message`.
const MAX_RAW_MESSAGE_CHARS: usize = 500;

/// Builds the message of a `Status` error from the response body. OpenAI and Anthropic both
/// send `{"error": {"message": ...}}`, and Anthropic adds `error.type`, which is kept as a
/// prefix because it names the fault class (`overloaded_error`, `invalid_request_error`).
pub(super) fn status_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = &value["error"];
        if let Some(message) = error["message"].as_str() {
            return match error["type"].as_str() {
                Some(kind) if !kind.is_empty() => format!("{kind}: {message}"),
                _ => message.to_string(),
            };
        }
    }

    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty response body)".to_string();
    }
    let mut message: String = text.chars().take(MAX_RAW_MESSAGE_CHARS).collect();
    if message.len() < text.len() {
        message.push_str(" [truncated]");
    }
    message
}

/// Reads the wait that a 429 or 503 response requests: `retry-after-ms` (sent by OpenAI) or
/// `retry-after` in seconds.
// NOTE: the HTTP-date form of `retry-after` is not parsed and yields `None`; OpenAI and
// Anthropic send seconds.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);

    if let Some(millis) = header("retry-after-ms").and_then(|value| value.parse::<f64>().ok()) {
        if millis.is_finite() && millis >= 0.0 {
            return Some(Duration::from_secs_f64(millis / 1000.0));
        }
    }
    let seconds = header("retry-after")?.parse::<f64>().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_from_openai_body() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","code":null}}"#;
        assert_eq!(status_message(body), "requests: Rate limit reached");
    }

    #[test]
    fn status_message_from_anthropic_body() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(status_message(body), "overloaded_error: Overloaded");
    }

    #[test]
    fn status_message_from_plain_body() {
        assert_eq!(status_message(b"  bad gateway \n"), "bad gateway");
        assert_eq!(status_message(b""), "(empty response body)");

        let long = "x".repeat(MAX_RAW_MESSAGE_CHARS + 10);
        let message = status_message(long.as_bytes());
        assert!(message.ends_with(" [truncated]"), "{message}");
        assert_eq!(message.len(), MAX_RAW_MESSAGE_CHARS + " [truncated]".len());
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);

        headers.insert("retry-after", "2".parse().expect("valid header value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));

        headers.insert("retry-after-ms", "1500".parse().expect("valid header value"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));

        let mut date = HeaderMap::new();
        date.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("valid header value"));
        assert_eq!(retry_after(&date), None);
    }

    #[test]
    fn retryable_statuses() {
        let status_error = |code: u16| ProviderError::Status {
            status: StatusCode::from_u16(code).expect("valid status code"),
            message: String::new(),
            retry_after: None,
        };
        for code in [408, 429, 500, 502, 503, 529] {
            assert!(status_error(code).is_retryable(), "HTTP {code}");
        }
        for code in [400, 401, 403, 404, 413, 422] {
            assert!(!status_error(code).is_retryable(), "HTTP {code}");
        }
    }

    #[test]
    fn retryable_upstream_kinds() {
        let upstream = |kind: Option<&str>| ProviderError::Upstream {
            kind: kind.map(str::to_string),
            message: String::new(),
        };
        assert!(upstream(Some("overloaded_error")).is_retryable());
        assert!(!upstream(Some("invalid_request_error")).is_retryable());
        assert!(!upstream(None).is_retryable());
    }
}
