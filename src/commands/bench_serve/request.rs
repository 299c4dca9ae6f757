//! Sending one request and timing its response. Nothing is retried: every failure is returned
//! with its kind, so the report can count it.

use std::fmt;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;

use super::endpoint::{Api, Endpoint};
use super::stream::{quote, ChatStreamTimer, Measured};
use crate::providers::sse::SseParser;

/// Kind of a request failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// The server returned this HTTP status, other than 2xx.
    Status(u16),
    /// No connection could be made.
    Connect,
    /// No complete response within the per-request timeout.
    Timeout,
    /// The response body ended or broke off before its end (`data: [DONE]` for a stream).
    StreamCut,
    /// A stream carried an `error` object in place of a chunk.
    ErrorEvent,
    /// The response was not what the API returns: not an event stream, or an invalid chunk.
    InvalidResponse,
    /// Any other failure of the HTTP client, such as an invalid header value.
    Request,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Status(code) => write!(f, "http {code}"),
            FailureKind::Connect => f.write_str("connect"),
            FailureKind::Timeout => f.write_str("timeout"),
            FailureKind::StreamCut => f.write_str("stream cut"),
            FailureKind::ErrorEvent => f.write_str("error event"),
            FailureKind::InvalidResponse => f.write_str("invalid response"),
            FailureKind::Request => f.write_str("request"),
        }
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    /// Description of the failure, with the start of the response body where there was one.
    pub message: String,
}

impl Failure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Result of one request.
pub type Outcome = Result<Measured, Failure>;

/// Sends benchmark requests with one shared connection pool.
pub struct Sender {
    client: reqwest::Client,
    api_key: Option<String>,
    timeout: Duration,
}

/// Bytes of an error response read for its message.
const ERROR_BODY_BYTES: usize = 2048;

impl Sender {
    /// Builds a client that resolves each endpoint's host name only to the addresses that
    /// were checked when the endpoint was resolved.
    pub fn new(endpoints: &[Endpoint], api_key: Option<String>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder().no_proxy();
        for endpoint in endpoints {
            if let Some((host, addresses)) = &endpoint.pinned {
                builder = builder.resolve_to_addrs(host, addresses);
            }
        }
        Ok(Self {
            client: builder.build()?,
            api_key,
            timeout,
        })
    }

    /// Sends `body` to `endpoint` and times the response, giving up after the timeout.
    pub async fn send(&self, endpoint: &Endpoint, api: Api, body: &Value) -> Outcome {
        match tokio::time::timeout(self.timeout, self.exchange(endpoint, api, body)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::new(
                FailureKind::Timeout,
                format!("no complete response within {} s", self.timeout.as_secs_f64()),
            )),
        }
    }

    async fn exchange(&self, endpoint: &Endpoint, api: Api, body: &Value) -> Outcome {
        let mut request = self.client.post(endpoint.api_url.clone()).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let sent = Instant::now();
        let response = request.send().await.map_err(client_failure)?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failure::new(FailureKind::Status(status.as_u16()), error_body(response).await));
        }
        match api {
            Api::Chat => read_stream(response, sent).await,
            Api::Classify => read_classification(response, sent).await,
        }
    }
}

/// Reads a chat completion event stream up to `data: [DONE]`.
async fn read_stream(response: reqwest::Response, sent: Instant) -> Outcome {
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !content_type.starts_with("text/event-stream") {
        return Err(Failure::new(
            FailureKind::InvalidResponse,
            format!("expected Content-Type text/event-stream for a streamed request, got `{content_type}`"),
        ));
    }

    let mut timer = ChatStreamTimer::new(sent);
    let mut parser = SseParser::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::new(FailureKind::StreamCut, error_chain(&e)))?;
        let at = Instant::now();
        let events = parser
            .feed(&chunk)
            .map_err(|e| Failure::new(FailureKind::InvalidResponse, e.to_string()))?;
        for event in events {
            timer.on_data(&event.data, at).map_err(|fault| {
                let kind = match fault {
                    super::stream::StreamFault::ErrorEvent(_) => FailureKind::ErrorEvent,
                    super::stream::StreamFault::InvalidChunk { .. } => FailureKind::InvalidResponse,
                };
                Failure::new(kind, fault.to_string())
            })?;
            if timer.is_done() {
                return Ok(timer.finish(at));
            }
        }
    }
    Err(Failure::new(FailureKind::StreamCut, "the stream ended before `data: [DONE]`"))
}

/// Reads a `/v1/classify` response, which must be JSON with a `results` array.
async fn read_classification(response: reqwest::Response, sent: Instant) -> Outcome {
    let body = response
        .bytes()
        .await
        .map_err(|e| Failure::new(FailureKind::StreamCut, error_chain(&e)))?;
    let ended = Instant::now();
    let parsed: Value = serde_json::from_slice(&body).map_err(|e| {
        Failure::new(
            FailureKind::InvalidResponse,
            format!("the body is not JSON ({e}): {}", quote(&String::from_utf8_lossy(&body))),
        )
    })?;
    if !parsed.get("results").is_some_and(Value::is_array) {
        return Err(Failure::new(
            FailureKind::InvalidResponse,
            format!("the body has no `results` array: {}", quote(&parsed.to_string())),
        ));
    }
    Ok(Measured {
        ttft: None,
        inter_token: Vec::new(),
        e2e: ended.saturating_duration_since(sent),
        output_tokens: 0,
        tokens_from_usage: false,
        prompt_tokens: None,
    })
}

/// Reads up to `ERROR_BODY_BYTES` of an error response for its message.
async fn error_body(response: reqwest::Response) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_BYTES {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    // OpenAI-style servers put the reason in `error.message`.
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|json| json["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    format!("{status}: {}", quote(&message))
}

fn client_failure(error: reqwest::Error) -> Failure {
    let kind = if error.is_connect() {
        FailureKind::Connect
    } else if error.is_timeout() {
        FailureKind::Timeout
    } else if error.is_body() || error.is_decode() {
        FailureKind::StreamCut
    } else {
        FailureKind::Request
    };
    Failure::new(kind, error_chain(&error))
}

/// Joins an error's message with those of its sources, which carry the cause (such as
/// `Connection refused`) that reqwest's own message leaves out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_read_as_report_keys() {
        assert_eq!(FailureKind::Status(503).to_string(), "http 503");
        assert_eq!(FailureKind::StreamCut.to_string(), "stream cut");
        // Statuses sort before the other kinds, and by code.
        let mut kinds = vec![FailureKind::Timeout, FailureKind::Status(503), FailureKind::Status(429)];
        kinds.sort();
        assert_eq!(kinds, [FailureKind::Status(429), FailureKind::Status(503), FailureKind::Timeout]);
    }
}
