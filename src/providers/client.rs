//! `Provider`: one remote API with its HTTP client, key and timeouts, sending requests in the
//! wire format of its kind.

use std::time::Duration;

use futures::Stream;
use tokio::time::{timeout_at, Instant};

use super::error::{retry_after, status_message};
use super::sse::{SseEvent, SseParser};
use super::{
    anthropic, openai, Answer, ApiKey, ChatRequest, ChatResult, ChatStream, ProviderConfig,
    ProviderError, ProviderKind, ProviderModel, StreamEvent, TimeoutPhase, Timing,
};

/// Largest non-streamed response body accepted, in bytes. A chat completion is far smaller.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Largest part of an error body read to build `ProviderError::Status`, in bytes.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// A client of one configured provider. Its Debug output shows the key as `<redacted>`.
/// Cloning is cheap and clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Provider {
    config: ProviderConfig,
    api_key: Option<ApiKey>,
    http: reqwest::Client,
}

impl Provider {
    /// Validates the configuration and reads the API key from the environment.
    pub fn new(config: ProviderConfig) -> Result<Self, ProviderError> {
        config.validate().map_err(ProviderError::InvalidConfig)?;

        let key_prefix = match config.kind {
            ProviderKind::OpenAi => openai::KEY_PREFIX,
            ProviderKind::Anthropic => anthropic::KEY_PREFIX,
        };
        let api_key = match &config.api_key_env {
            Some(var) => Some(ApiKey::from_env(&config.name, var, key_prefix)?),
            None => None,
        };

        // Redirects are not followed, because reqwest would forward `x-api-key` to another
        // host; provider APIs do not redirect, so a 3xx becomes a `Status` error.
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tierd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ProviderError::InvalidConfig(format!(
                    "provider `{}`: failed to build the HTTP client: {e}",
                    config.name
                ))
            })?;

        Ok(Self { config, api_key, http })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// Returns the configured model that clients call `id`.
    pub fn model(&self, id: &str) -> Option<&ProviderModel> {
        self.config.models.iter().find(|model| model.id == id)
    }

    /// Sends a non-streaming request for model `model` (a configured `id`) and reads the whole
    /// response. Only `timeouts.total_ms` bounds it; see `TimeoutConfig::first_byte_ms`.
    pub async fn chat(&self, model: &str, request: &ChatRequest) -> Result<ChatResult, ProviderError> {
        let upstream_model = self.upstream_model(model)?;
        let total_limit = self.config.timeouts.total();
        let total_timeout = || ProviderError::Timeout {
            phase: TimeoutPhase::Total,
            limit: total_limit,
        };
        tracing::debug!(provider = %self.config.name, model, upstream_model, stream = false, "sending request to provider");

        let start = Instant::now();
        let deadline = start + total_limit;
        let send = self.build_request(upstream_model, request, false).send();
        let response = timeout_at(deadline, send)
            .await
            .map_err(|_| total_timeout())?
            .map_err(|e| ProviderError::from_send(e, self.config.timeouts.connect()))?;
        let mut response = check_status(response, deadline, self.api_key.as_ref()).await?;

        let mut body = Vec::new();
        let mut first_byte = None;
        loop {
            let chunk = timeout_at(deadline, response.chunk())
                .await
                .map_err(|_| total_timeout())?
                .map_err(|source| ProviderError::StreamCut { source: Some(source) })?;
            let Some(chunk) = chunk else { break };

            first_byte.get_or_insert_with(|| start.elapsed());
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ProviderError::malformed(format!(
                    "response body exceeds {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let total = start.elapsed();

        let answer: Answer = match self.config.kind {
            ProviderKind::OpenAi => openai::parse_response(&body)?,
            ProviderKind::Anthropic => anthropic::parse_response(&body)?,
        };
        tracing::debug!(
            provider = %self.config.name,
            model,
            total_ms = total.as_millis() as u64,
            prompt_tokens = answer.usage.prompt_tokens,
            completion_tokens = answer.usage.completion_tokens,
            "provider answered"
        );
        Ok(ChatResult {
            text: answer.text,
            finish_reason: answer.finish_reason,
            usage: answer.usage,
            upstream_model: answer.model.unwrap_or_else(|| upstream_model.to_string()),
            timing: Timing {
                first_byte: first_byte.unwrap_or(total),
                total,
            },
        })
    }

    /// Sends a streaming request and returns once the first chunk of the body has arrived and
    /// been decoded. Failures up to that point, including an error event or malformed data in
    /// that chunk, are returned here, so a caller that has sent nothing yet can fall back.
    /// Later failures are the stream's last item.
    pub async fn chat_stream(&self, model: &str, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let upstream_model = self.upstream_model(model)?;
        let timeouts = self.config.timeouts;
        tracing::debug!(provider = %self.config.name, model, upstream_model, stream = true, "sending request to provider");

        let start = Instant::now();
        let total_deadline = start + timeouts.total();
        let first_byte_deadline = start + timeouts.first_byte();
        let first_timeout = if first_byte_deadline < total_deadline {
            ProviderError::Timeout {
                phase: TimeoutPhase::FirstByte,
                limit: timeouts.first_byte(),
            }
        } else {
            ProviderError::Timeout {
                phase: TimeoutPhase::Total,
                limit: timeouts.total(),
            }
        };
        let first_deadline = first_byte_deadline.min(total_deadline);

        let send = self.build_request(upstream_model, request, true).send();
        let response = match timeout_at(first_deadline, send).await {
            Err(_) => return Err(first_timeout),
            Ok(result) => result.map_err(|e| ProviderError::from_send(e, timeouts.connect()))?,
        };
        let mut response = check_status(response, total_deadline, self.api_key.as_ref()).await?;
        check_event_stream(&response)?;

        let first_chunk = match timeout_at(first_deadline, response.chunk()).await {
            Err(_) => return Err(first_timeout),
            Ok(result) => result
                .map_err(|source| ProviderError::StreamCut { source: Some(source) })?
                .ok_or(ProviderError::StreamCut { source: None })?,
        };
        let first_byte = start.elapsed();

        let mut reader = EventReader {
            parser: SseParser::new(),
            decoder: StreamDecoder::new(self.config.kind),
        };
        let mut first_events = Vec::new();
        reader.read_chunk(&first_chunk, &mut first_events)?;

        let events = stream_events(response, reader, first_events, total_deadline, timeouts.total());
        Ok(ChatStream {
            upstream_model: upstream_model.to_string(),
            first_byte,
            events: Box::pin(events),
        })
    }

    fn upstream_model(&self, model: &str) -> Result<&str, ProviderError> {
        self.model(model)
            .map(ProviderModel::upstream_name)
            .ok_or_else(|| ProviderError::UnknownModel {
                provider: self.config.name.clone(),
                model: model.to_string(),
            })
    }

    fn build_request(&self, upstream_model: &str, request: &ChatRequest, stream: bool) -> reqwest::RequestBuilder {
        let config = &self.config;
        match config.kind {
            ProviderKind::OpenAi => openai::build_request(
                &self.http,
                &config.base_url,
                self.api_key.as_ref(),
                upstream_model,
                request,
                stream,
            ),
            ProviderKind::Anthropic => {
                let settings = anthropic::RequestSettings {
                    base_url: &config.base_url,
                    api_key: self.api_key.as_ref(),
                    version: &config.anthropic_version,
                    default_max_tokens: config.default_max_tokens,
                };
                anthropic::build_request(&self.http, &settings, upstream_model, request, stream)
            }
        }
    }
}

/// Turns a response with a status other than 2xx into `ProviderError::Status`, reading at most
/// `MAX_ERROR_BODY_BYTES` of its body before `deadline`.
async fn check_status(
    mut response: reqwest::Response,
    deadline: Instant,
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }

    let retry_after = retry_after(response.headers());
    let mut body = Vec::new();
    // A body that fails or stalls leaves the message to what arrived, because the
    // status already identifies the failure.
    while body.len() < MAX_ERROR_BODY_BYTES {
        match timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);

    let message = status_message(&body);
    Err(ProviderError::Status {
        status,
        message: key.map_or_else(|| message.clone(), |key| key.scrub(&message)),
        retry_after,
    })
}

/// Rejects a 2xx response to a streaming request that is not an event stream, such as the JSON
/// body of a server that ignores `stream`. A response without `content-type` is read as a stream.
fn check_event_stream(response: &reqwest::Response) -> Result<(), ProviderError> {
    let Some(content_type) = response.headers().get(reqwest::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let content_type = content_type.to_str().unwrap_or_default();
    if content_type.trim_start().to_ascii_lowercase().starts_with("text/event-stream") {
        return Ok(());
    }
    Err(ProviderError::malformed(format!(
        "streaming response has content-type `{content_type}` instead of `text/event-stream`"
    )))
}

/// The wire-specific decoder of a stream's events.
enum StreamDecoder {
    OpenAi(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

impl StreamDecoder {
    fn new(kind: ProviderKind) -> Self {
        match kind {
            ProviderKind::OpenAi => Self::OpenAi(openai::StreamDecoder::default()),
            ProviderKind::Anthropic => Self::Anthropic(anthropic::StreamDecoder::default()),
        }
    }

    fn decode(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        match self {
            Self::OpenAi(decoder) => decoder.decode(event, out),
            Self::Anthropic(decoder) => decoder.decode(event, out),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Self::OpenAi(decoder) => decoder.is_finished(),
            Self::Anthropic(decoder) => decoder.is_finished(),
        }
    }

    fn end_of_body(&mut self) -> Result<StreamEvent, ProviderError> {
        match self {
            Self::OpenAi(decoder) => decoder.end_of_body(),
            Self::Anthropic(decoder) => decoder.end_of_body(),
        }
    }
}

/// The SSE parser and wire decoder of one stream, fed with body chunks.
struct EventReader {
    parser: SseParser,
    decoder: StreamDecoder,
}

impl EventReader {
    /// Decodes the events that `chunk` completes into `out`, ignoring any that follow the
    /// terminal event. Events decoded before an error stay in `out`.
    fn read_chunk(&mut self, chunk: &[u8], out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        let events = self
            .parser
            .feed(chunk)
            .map_err(|e| ProviderError::malformed(e.to_string()))?;
        for event in &events {
            if self.decoder.is_finished() {
                break;
            }
            self.decoder.decode(event, out)?;
        }
        Ok(())
    }
}

/// Yields the events decoded from the first chunk, then those of the rest of the body, until
/// the terminal event or the first error. Dropping the stream drops `response`, which closes
/// the connection.
fn stream_events(
    mut response: reqwest::Response,
    mut reader: EventReader,
    first_events: Vec<StreamEvent>,
    deadline: Instant,
    total_limit: Duration,
) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send {
    async_stream::stream! {
        for event in first_events {
            yield Ok(event);
        }

        while !reader.decoder.is_finished() {
            let chunk = match timeout_at(deadline, response.chunk()).await {
                Err(_) => {
                    yield Err(ProviderError::Timeout { phase: TimeoutPhase::Total, limit: total_limit });
                    return;
                }
                Ok(Err(source)) => {
                    yield Err(ProviderError::StreamCut { source: Some(source) });
                    return;
                }
                Ok(Ok(None)) => {
                    yield reader.decoder.end_of_body();
                    return;
                }
                Ok(Ok(Some(chunk))) => chunk,
            };

            let mut events = Vec::new();
            let result = reader.read_chunk(&chunk, &mut events);
            for event in events {
                yield Ok(event);
            }
            if let Err(error) = result {
                yield Err(error);
                return;
            }
        }
    }
}
