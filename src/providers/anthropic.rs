//! The Anthropic messages wire format: `POST {base_url}/messages`.
//!
//! Stop reasons map to OpenAI's vocabulary as `end_turn` and `stop_sequence` to `stop`,
//! `max_tokens` and `model_context_window_exceeded` to `length`, and `refusal` to
//! `content_filter`. Others, such as `tool_use` and `pause_turn`, pass through unchanged.

use serde::{Deserialize, Serialize};

use super::error::ProviderError;
use super::key::ApiKey;
use super::sse::SseEvent;
use super::{Answer, ChatRequest, StreamEvent, Usage};

/// The key goes in `x-api-key` as is.
pub(super) const KEY_PREFIX: &str = "";

#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    stream: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// Settings of the provider that shape every request.
pub(super) struct RequestSettings<'a> {
    pub base_url: &'a str,
    pub api_key: Option<&'a ApiKey>,
    pub version: &'a str,
    pub default_max_tokens: u64,
}

/// Builds the request. System messages move to the top-level `system` field, joined with
/// blank lines, because the messages API accepts only `user` and `assistant` turns.
pub(super) fn build_request(
    http: &reqwest::Client,
    settings: &RequestSettings<'_>,
    upstream_model: &str,
    request: &ChatRequest,
    stream: bool,
) -> reqwest::RequestBuilder {
    let (system, turns): (Vec<_>, Vec<_>) = request
        .messages
        .iter()
        .partition(|message| message.role == "system");
    let system = (!system.is_empty()).then(|| {
        system
            .iter()
            .map(|message| message.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    });

    // Anthropic's temperature range is 0 to 1 where OpenAI's is 0 to 2, so a larger value is
    // clamped rather than rejected with HTTP 400.
    let temperature = request.temperature.map(|value| value.clamp(0.0, 1.0));
    // NOTE: recent Claude models reject requests that set both `temperature` and `top_p`
    // (HTTP 400), so `top_p` is sent only when `temperature` is not set.
    let top_p = request.top_p.filter(|_| temperature.is_none());

    let body = RequestBody {
        model: upstream_model,
        max_tokens: request.max_tokens.unwrap_or(settings.default_max_tokens),
        system,
        messages: turns
            .iter()
            .map(|message| Message {
                role: &message.role,
                content: &message.content,
            })
            .collect(),
        temperature,
        top_p,
        stop_sequences: &request.stop,
        stream,
    };

    let mut builder = http
        .post(format!("{}/messages", settings.base_url.trim_end_matches('/')))
        .header("anthropic-version", settings.version)
        .json(&body);
    if let Some(key) = settings.api_key {
        builder = builder.header("x-api-key", key.header_value());
    }
    builder
}

/// Maps an Anthropic stop reason to OpenAI's `finish_reason` vocabulary.
pub(super) fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "refusal" => "content_filter",
        other => other,
    }
    .to_string()
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    model: Option<String>,
    content: Vec<ContentBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum ContentBlock {
    #[serde(rename = "text")]
    Text { text: String },
    /// Tool use, thinking and other blocks, which tierd does not request.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireUsage {
    input_tokens: u64,
    output_tokens: u64,
}


// NOTE: `usage.input_tokens` excludes prompt-cache reads and writes, which tierd does not
// request; a request that hits a cache would be under-counted.
pub(super) fn parse_response(body: &[u8]) -> Result<Answer, ProviderError> {
    let response: Response = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed(format!("invalid messages API JSON: {e}")))?;
    let stop_reason = response
        .stop_reason
        .ok_or_else(|| ProviderError::malformed("message has no `stop_reason`"))?;
    let text = response
        .content
        .into_iter()
        .filter_map(|block| match block {
            ContentBlock::Text { text } => Some(text),
            ContentBlock::Other => None,
        })
        .collect::<String>();

    Ok(Answer {
        text,
        finish_reason: finish_reason(&stop_reason),
        usage: Usage {
            prompt_tokens: response.usage.input_tokens,
            completion_tokens: response.usage.output_tokens,
        },
        model: response.model,
    })
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart { message: StartMessage },
    ContentBlockDelta { delta: BlockDelta },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<DeltaUsage>,
    },
    MessageStop,
    Error { error: ErrorBody },
    /// `ping`, `content_block_start`, `content_block_stop` and event types added later, which
    /// the API versioning policy allows clients to ignore.
    #[serde(other)]
    Ignored,
}

#[derive(Deserialize)]
struct StartMessage {
    usage: StartUsage,
}

#[derive(Deserialize)]
struct StartUsage {
    input_tokens: u64,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum BlockDelta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Cumulative counts; `input_tokens` appears here only in newer API versions.
#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    output_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Turns the events of a streamed message into `StreamEvent`s. Only `message_stop` ends the
/// stream cleanly.
#[derive(Default)]
pub(super) struct StreamDecoder {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    stop_reason: Option<String>,
    finished: bool,
}

impl StreamDecoder {
    pub fn decode(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        // The `type` field inside `data` repeats the `event:` name, so it alone decides.
        let parsed: Event = serde_json::from_str(&event.data).map_err(|e| {
            ProviderError::malformed(format!("invalid `{}` event data: {e}", event.event))
        })?;

        match parsed {
            Event::MessageStart { message } => self.input_tokens = Some(message.usage.input_tokens),
            Event::ContentBlockDelta {
                delta: BlockDelta::Text { text },
            } => {
                if !text.is_empty() {
                    out.push(StreamEvent::Delta { text });
                }
            }
            Event::ContentBlockDelta {
                delta: BlockDelta::Other,
            } => {}
            Event::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                }
                if let Some(usage) = usage {
                    self.output_tokens = Some(usage.output_tokens);
                    if usage.input_tokens.is_some() {
                        self.input_tokens = usage.input_tokens;
                    }
                }
            }
            Event::MessageStop => {
                let stop_reason = self.stop_reason.take().ok_or_else(|| {
                    ProviderError::malformed("`message_stop` arrived before any `stop_reason`")
                })?;
                let usage = match (self.input_tokens, self.output_tokens) {
                    (Some(prompt_tokens), Some(completion_tokens)) => Some(Usage {
                        prompt_tokens,
                        completion_tokens,
                    }),
                    _ => None,
                };
                self.finished = true;
                out.push(StreamEvent::Finished {
                    finish_reason: finish_reason(&stop_reason),
                    usage,
                });
            }
            Event::Error { error } => {
                return Err(ProviderError::Upstream {
                    kind: error.kind,
                    message: error.message.unwrap_or_else(|| "(no message)".to_string()),
                })
            }
            Event::Ignored => {}
        }
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Returns the error for a body that ended before `message_stop`.
    pub fn end_of_body(&mut self) -> Result<StreamEvent, ProviderError> {
        Err(ProviderError::StreamCut { source: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> SseEvent {
        SseEvent {
            event: name.to_string(),
            data: data.to_string(),
        }
    }

    #[test]
    fn stop_reasons_map_to_openai_vocabulary() {
        assert_eq!(finish_reason("end_turn"), "stop");
        assert_eq!(finish_reason("stop_sequence"), "stop");
        assert_eq!(finish_reason("max_tokens"), "length");
        assert_eq!(finish_reason("refusal"), "content_filter");
        assert_eq!(finish_reason("tool_use"), "tool_use");
    }

    #[test]
    fn stream_events_decode() {
        let mut decoder = StreamDecoder::default();
        let mut out = Vec::new();
        for (name, data) in [
            ("message_start", r#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":12,"output_tokens":1}}}"#),
            ("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
            ("ping", r#"{"type":"ping"}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}"#),
            ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
            ("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":7}}"#),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ] {
            decoder.decode(&event(name, data), &mut out).expect(name);
        }
        assert!(decoder.is_finished());
        assert_eq!(
            out,
            [
                StreamEvent::Delta { text: "Hello".into() },
                StreamEvent::Finished {
                    finish_reason: "length".into(),
                    usage: Some(Usage {
                        prompt_tokens: 12,
                        completion_tokens: 7
                    }),
                },
            ]
        );
    }

    #[test]
    fn error_event_is_upstream_error() {
        let mut decoder = StreamDecoder::default();
        let data = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let error = decoder.decode(&event("error", data), &mut Vec::new()).expect_err("error event");
        assert!(
            matches!(&error, ProviderError::Upstream { kind: Some(kind), message } if kind == "overloaded_error" && message == "Overloaded"),
            "{error:?}"
        );
        assert!(error.is_retryable());
    }

    #[test]
    fn response_text_blocks_are_joined() {
        let body = br#"{"model":"claude-x","content":[{"type":"text","text":"a"},{"type":"tool_use","id":"t","name":"f","input":{}},{"type":"text","text":"b"}],"stop_reason":"stop_sequence","usage":{"input_tokens":3,"output_tokens":2}}"#;
        let answer = parse_response(body).expect("valid message");
        assert_eq!(answer.text, "ab");
        assert_eq!(answer.finish_reason, "stop");
        assert_eq!(answer.model.as_deref(), Some("claude-x"));
    }
}
