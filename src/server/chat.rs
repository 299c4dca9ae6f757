//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::error::ApiError;
use super::json::ApiJson;
use super::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, MessageContent, TopLogprob,
    Usage,
};
use super::params::{check_context, reject_unsupported, validate, MAX_TOP_LOGPROBS};
use super::{submit, unix_time, AppState, Submitted, SYSTEM_FINGERPRINT};
use crate::engine::{ChatMessage, GenerationEvent, GenerationRequest, TokenLogprob};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    request_id: axum::Extension<super::RequestId>,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let registry = state.registry()?;
    let served = registry
        .get(&body.model)
        .ok_or_else(|| ApiError::model_not_found(&body.model))?;

    reject_unsupported("tools", &body.tools, &[serde_json::json!([])])?;
    reject_unsupported("tool_choice", &body.tool_choice, &[serde_json::json!("none")])?;
    reject_unsupported("functions", &body.functions, &[serde_json::json!([])])?;
    reject_unsupported("function_call", &body.function_call, &[serde_json::json!("none")])?;
    reject_unsupported("response_format", &body.response_format, &[serde_json::json!({"type": "text"})])?;
    let messages = convert_messages(&body)?;
    let top_logprobs = match (body.logprobs.unwrap_or(false), body.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid_request(
                "`top_logprobs` requires `logprobs` to be true.",
                Some("top_logprobs"),
            ))
        }
        (_, Some(count)) if count > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid_request(
                format!("Invalid value for `top_logprobs`: {count}; it must be at most {MAX_TOP_LOGPROBS}."),
                Some("top_logprobs"),
            ))
        }
        (true, count) => Some(count.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let override_max = body
        .max_completion_tokens
        .map(|value| (value, "max_completion_tokens"));
    let params = validate(body.fields, override_max, state.config.server.default_max_tokens)?;

    // Tokenizing a multi-megabyte prompt takes long enough to stall the async runtime, so it
    // runs on the blocking pool.
    let tokenizing = served.clone();
    let rendered = tokio::task::spawn_blocking(move || tokenizing.chat_prompt(&messages))
        .await
        .map_err(ApiError::internal)?;
    let prompt_tokens = match rendered {
        Ok(Some(tokens)) => tokens,
        Ok(None) => {
            return Err(ApiError::invalid_request(
                format!(
                    "The model `{}` has no chat template; use /v1/completions or set `chat_template` in the config.",
                    served.id
                ),
                Some("model"),
            ))
        }
        Err(message) => return Err(ApiError::invalid_request(message, Some("messages"))),
    };
    check_context(prompt_tokens.len(), served.context_length, "messages")?;

    let max_tokens = params
        .max_tokens
        .min(served.context_length - prompt_tokens.len());
    let generation = GenerationRequest {
        request_id: request_id.0 .0.clone(),
        prompt_tokens,
        max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        logprobs: top_logprobs,
    };
    let submitted = submit(&served, generation)?;

    // A fresh id: clients may reuse their X-Request-Id, but completion ids must be unique.
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if params.stream {
        let stream = chat_stream(id, served.id.clone(), submitted, params.include_usage);
        return Ok(Sse::new(stream).into_response());
    }

    let collected = submitted.collect().await?;
    let logprobs = top_logprobs.map(|_| ChatLogprobs {
        content: collected.logprobs.iter().map(chat_logprob).collect(),
    });
    let response = ChatCompletion {
        id,
        object: "chat.completion",
        created: unix_time(),
        model: served.id.clone(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: collected.text,
            },
            logprobs,
            finish_reason: collected.finish_reason,
        }],
        usage: collected.usage,
    };
    Ok(axum::Json(response).into_response())
}

fn convert_messages(body: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if body.messages.is_empty() {
        return Err(ApiError::invalid_request(
            "`messages` must contain at least one message.",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (index, message) in body.messages.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid_request(
                    format!(
                        "Invalid value for `messages[{index}].role`: `{other}`; supported roles are system, developer, user and assistant."
                    ),
                    Some(&format!("messages[{index}].role")),
                ))
            }
        };
        let content = match &message.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (part_index, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(part_text)) => text.push_str(part_text),
                        ("text", None) => {
                            return Err(ApiError::invalid_request(
                                format!("`messages[{index}].content[{part_index}]` has type text but no `text`."),
                                Some(&format!("messages[{index}].content[{part_index}].text")),
                            ))
                        }
                        (other, _) => {
                            return Err(ApiError::invalid_request(
                                format!(
                                    "Invalid value for `messages[{index}].content[{part_index}].type`: `{other}`; only text parts are supported."
                                ),
                                Some(&format!("messages[{index}].content[{part_index}].type")),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(messages)
}

fn chat_logprob(token: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: token.token.clone(),
        logprob: token.logprob,
        bytes: token.bytes.clone(),
        top_logprobs: token
            .top
            .iter()
            .map(|(text, logprob, bytes)| TopLogprob {
                token: text.clone(),
                logprob: *logprob,
                bytes: bytes.clone(),
            })
            .collect(),
    }
}

fn chat_stream(
    id: String,
    model: String,
    mut submitted: Submitted,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let created = unix_time();
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices,
        usage: include_usage.then_some(usage),
    };

    async_stream::stream! {
        let role = ChatChunkChoice {
            index: 0,
            delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
            logprobs: None,
            finish_reason: None,
        };
        yield Ok(super::sse_json(&chunk(vec![role], None)));

        while let Some(event) = submitted.events.recv().await {
            match event {
                GenerationEvent::Delta { text, logprobs } => {
                    let logprobs = (!logprobs.is_empty()).then(|| ChatLogprobs {
                        content: logprobs.iter().map(chat_logprob).collect(),
                    });
                    let choice = ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta { role: None, content: Some(text) },
                        logprobs,
                        finish_reason: None,
                    };
                    yield Ok(super::sse_json(&chunk(vec![choice], None)));
                }
                GenerationEvent::Finished { reason, prompt_tokens, completion_tokens, timings } => {
                    submitted.log_finished(reason.as_str(), prompt_tokens, completion_tokens, &timings);
                    let choice = ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta::default(),
                        logprobs: None,
                        finish_reason: Some(reason.as_str()),
                    };
                    yield Ok(super::sse_json(&chunk(vec![choice], None)));
                    if include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens);
                        yield Ok(super::sse_json(&chunk(Vec::new(), Some(usage))));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
                GenerationEvent::Failed(message) => {
                    yield Ok(super::sse_json(&ApiError::internal(message).body()));
                    return;
                }
            }
        }
        // The worker ended without a final event: end with an error, never a clean [DONE].
        yield Ok(super::sse_json(&ApiError::internal("generation ended without finishing").body()));
    }
}
