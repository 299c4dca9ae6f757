//! Clients of remote chat APIs (OpenAI and Anthropic), used to escalate requests that the
//! local models cannot answer confidently.
//!
//! `Provider` (in `client.rs`) owns the HTTP client, timeouts and streaming; `openai.rs` and
//! `anthropic.rs` translate requests, responses and stream events of one wire format, and
//! `sse.rs` splits a response body into server-sent events for them.

mod anthropic;
mod client;
mod config;
mod error;
mod key;
mod openai;
pub mod sse;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

pub use crate::engine::chat_template::ChatMessage;
pub use client::Provider;
pub use config::{validate_providers, ProviderConfig, ProviderKind, ProviderModel, TimeoutConfig};
pub use error::{ProviderError, TimeoutPhase};
pub use key::ApiKey;

/// A chat request in the form both wire formats are built from. The server fills it from a
/// client's request after its own validation, which maps the `developer` role to `system` and
/// flattens text parts, so the roles here are `system`, `user` and `assistant`.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Completion token limit; Anthropic requests without it use `default_max_tokens`.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    /// Whether a streamed OpenAI request requests token usage (`stream_options.include_usage`).
    /// Anthropic streams always report usage.
    pub stream_usage: bool,
}

impl ChatRequest {
    /// Creates a request with no sampling settings that requests usage in streams.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            stream_usage: true,
        }
    }
}

/// Token counts reported by the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl From<Usage> for crate::server::openai::Usage {
    fn from(usage: Usage) -> Self {
        Self::new(usage.prompt_tokens as usize, usage.completion_tokens as usize)
    }
}

/// Durations measured from sending the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Until the first byte of the response body.
    pub first_byte: Duration,
    /// Until the last byte of the response body.
    pub total: Duration,
}

/// A non-streamed chat completion.
#[derive(Debug, Clone)]
pub struct ChatResult {
    pub text: String,
    /// In OpenAI's vocabulary (`stop`, `length`, `content_filter`, ...); see each wire module
    /// for how its reasons are mapped.
    pub finish_reason: String,
    pub usage: Usage,
    /// Model named in the response, such as a dated snapshot of the requested alias; the
    /// requested upstream name when the response names none.
    pub upstream_model: String,
    pub timing: Timing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Text generated since the previous event; never empty.
    Delta { text: String },
    /// The provider's terminal event, always the last item of a stream. `usage` is `None` when
    /// the provider did not report it, such as an OpenAI stream requested without usage.
    Finished {
        finish_reason: String,
        usage: Option<Usage>,
    },
}

/// Fields of a non-streamed completion that a wire module parses, before timing is added.
struct Answer {
    text: String,
    finish_reason: String,
    usage: Usage,
    /// Model named in the response, if it names one.
    model: Option<String>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// A streamed answer: `Delta` items, then either one `Finished` item or one error item.
/// The stream never ends without one of the two. Dropping it closes the HTTP connection.
pub struct ChatStream {
    /// Upstream model name that the request was sent with.
    pub upstream_model: String,
    /// Time from sending the request to the first byte of the response body.
    pub first_byte: Duration,
    events: EventStream,
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream")
            .field("upstream_model", &self.upstream_model)
            .field("first_byte", &self.first_byte)
            .finish_non_exhaustive()
    }
}

impl ChatStream {
    /// Returns the stream with `inspect` called on every item before the caller receives it.
    /// `inspect` is dropped with the stream, so a guard it owns also detects an abandoned stream.
    pub fn inspect_events(
        self,
        inspect: impl FnMut(&Result<StreamEvent, ProviderError>) + Send + 'static,
    ) -> Self {
        use futures::StreamExt;
        Self {
            events: Box::pin(self.events.inspect(inspect)),
            ..self
        }
    }
}

impl Stream for ChatStream {
    type Item = Result<StreamEvent, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.as_mut().poll_next(cx)
    }
}
