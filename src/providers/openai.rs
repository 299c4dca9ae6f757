//! The OpenAI chat completions wire format: `POST {base_url}/chat/completions`.

use serde::{Deserialize, Serialize};

use super::error::ProviderError;
use super::key::ApiKey;
use super::sse::SseEvent;
use super::{Answer, ChatRequest, StreamEvent, Usage};

/// Header carrying the key, as `Bearer {key}`.
pub(super) const KEY_PREFIX: &str = "Bearer ";

#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    // NOTE: `max_completion_tokens` replaces the deprecated `max_tokens`, which OpenAI's
    // reasoning models reject. An OpenAI-compatible server that supports only `max_tokens`
    // ignores the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

pub(super) fn build_request(
    http: &reqwest::Client,
    base_url: &str,
    api_key: Option<&ApiKey>,
    upstream_model: &str,
    request: &ChatRequest,
    stream: bool,
) -> reqwest::RequestBuilder {
    let body = RequestBody {
        model: upstream_model,
        messages: request
            .messages
            .iter()
            .map(|message| Message {
                role: &message.role,
                content: &message.content,
            })
            .collect(),
        max_completion_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        stop: &request.stop,
        stream,
        stream_options: (stream && request.stream_usage).then_some(StreamOptions { include_usage: true }),
    };

    let mut builder = http
        .post(format!("{}/chat/completions", base_url.trim_end_matches('/')))
        .json(&body);
    if let Some(key) = api_key {
        builder = builder.header(reqwest::header::AUTHORIZATION, key.header_value());
    }
    builder
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }
    }
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    /// Null when the model returned only a refusal or tool calls.
    #[serde(default)]
    content: Option<String>,
}


/// Parses a non-streamed response body. OpenAI's finish reasons are already the vocabulary
/// tierd uses, so they pass through unchanged.
pub(super) fn parse_response(body: &[u8]) -> Result<Answer, ProviderError> {
    let response: Response = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed(format!("invalid chat completion JSON: {e}")))?;
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| ProviderError::malformed("chat completion has no choices"))?;
    let finish_reason = choice
        .finish_reason
        .ok_or_else(|| ProviderError::malformed("chat completion has no `finish_reason`"))?;
    let usage = response
        .usage
        .ok_or_else(|| ProviderError::malformed("chat completion has no `usage`"))?;

    Ok(Answer {
        text: choice.message.content.unwrap_or_default(),
        finish_reason,
        usage: usage.into(),
        model: response.model,
    })
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Set instead of `choices` when the server fails after the stream started.
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// Turns `data:` events of a streamed chat completion into `StreamEvent`s. The stream ends
/// with `data: [DONE]`; when usage is requested, a chunk with empty `choices` and the usage
/// arrives between the chunk carrying `finish_reason` and `[DONE]`.
#[derive(Default)]
pub(super) struct StreamDecoder {
    finish_reason: Option<String>,
    usage: Option<Usage>,
    finished: bool,
}

impl StreamDecoder {
    pub fn decode(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if event.data.trim() == "[DONE]" {
            let finish_reason = self.finish_reason.take().ok_or_else(|| {
                ProviderError::malformed("stream sent [DONE] before any chunk had a `finish_reason`")
            })?;
            self.finished = true;
            out.push(StreamEvent::Finished {
                finish_reason,
                usage: self.usage,
            });
            return Ok(());
        }

        let chunk: Chunk = serde_json::from_str(&event.data)
            .map_err(|e| ProviderError::malformed(format!("invalid chat completion chunk: {e}")))?;
        if let Some(error) = chunk.error {
            return Err(ProviderError::Upstream {
                kind: error.kind,
                message: error.message.unwrap_or_else(|| "(no message)".to_string()),
            });
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        // tierd sends n = 1, so only the first choice exists.
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.and_then(|delta| delta.content) {
                if !text.is_empty() {
                    out.push(StreamEvent::Delta { text });
                }
            }
            if choice.finish_reason.is_some() {
                self.finish_reason = choice.finish_reason;
            }
        }
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Returns the terminal event for a body that ended without `[DONE]`. A chunk carrying
    /// `finish_reason` also marks the completion as whole, so only a body without one is cut.
    pub fn end_of_body(&mut self) -> Result<StreamEvent, ProviderError> {
        match self.finish_reason.take() {
            Some(finish_reason) => Ok(StreamEvent::Finished {
                finish_reason,
                usage: self.usage,
            }),
            None => Err(ProviderError::StreamCut { source: None }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> SseEvent {
        SseEvent {
            event: "message".to_string(),
            data: text.to_string(),
        }
    }

    #[test]
    fn stream_with_usage_chunk() {
        let mut decoder = StreamDecoder::default();
        let mut out = Vec::new();
        for text in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
            "[DONE]",
        ] {
            decoder.decode(&data(text), &mut out).expect("valid chunk");
        }
        assert!(decoder.is_finished());
        assert_eq!(
            out,
            [
                StreamEvent::Delta { text: "Hi".into() },
                StreamEvent::Finished {
                    finish_reason: "length".into(),
                    usage: Some(Usage {
                        prompt_tokens: 5,
                        completion_tokens: 1
                    }),
                },
            ]
        );
    }

    #[test]
    fn done_without_finish_reason_is_malformed() {
        let mut decoder = StreamDecoder::default();
        let error = decoder.decode(&data("[DONE]"), &mut Vec::new()).expect_err("no finish_reason");
        assert!(matches!(error, ProviderError::Malformed { .. }), "{error:?}");
    }

    #[test]
    fn end_of_body_after_finish_reason_is_clean() {
        let mut decoder = StreamDecoder::default();
        let chunk = r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#;
        decoder.decode(&data(chunk), &mut Vec::new()).expect("valid chunk");
        assert!(matches!(decoder.end_of_body(), Ok(StreamEvent::Finished { usage: None, .. })));

        let mut cut = StreamDecoder::default();
        assert!(matches!(cut.end_of_body(), Err(ProviderError::StreamCut { .. })));
    }

    #[test]
    fn error_chunk_is_upstream_error() {
        let mut decoder = StreamDecoder::default();
        let chunk = r#"{"error":{"message":"server overloaded","type":"server_error"}}"#;
        let error = decoder.decode(&data(chunk), &mut Vec::new()).expect_err("error chunk");
        assert!(
            matches!(&error, ProviderError::Upstream { kind: Some(kind), message } if kind == "server_error" && message == "server overloaded"),
            "{error:?}"
        );
    }

    #[test]
    fn response_without_choices_is_malformed() {
        let error = parse_response(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#)
            .err()
            .expect("no choices");
        assert!(matches!(error, ProviderError::Malformed { .. }), "{error:?}");
    }
}
