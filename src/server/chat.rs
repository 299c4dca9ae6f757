//! `POST /v1/chat/completions`.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
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
use super::params::{check_context, reject_unsupported, validate, Validated, MAX_TOP_LOGPROBS};
use super::budget::{check_budget, BudgetGate};
use super::served::Served;
use super::{submit, unix_time, AppState, Collected, Submitted, SYSTEM_FINGERPRINT};
use crate::engine::{ChatMessage, GenerationEvent, GenerationRequest, TokenLogprob};
use crate::audit::handle::AuditHandle;
use crate::policy::Policy;
use crate::registry::ServedModel;
use crate::routing::criteria::{Criteria, CriteriaFields};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    request_id: axum::Extension<super::RequestId>,
    audit: Option<axum::Extension<AuditHandle>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let request_id = request_id.0 .0;
    let audit = audit.map(|handle| handle.0);
    if let Some(audit) = &audit {
        audit_request(audit, &body);
    }
    let policy = state.policy();
    if let Some(route) = policy.routes.get(&body.model) {
        return super::routed::chat(&state, &policy, route, &request_id, audit, &headers, body).await;
    }
    let registry = state.registry()?;
    let served = registry
        .get(&body.model)
        .ok_or_else(|| ApiError::model_not_found(&body.model))?;
    let input = ChatInput::parse(body, &policy)?;
    // Criteria only steer routes, but a malformed one is still an error.
    Criteria::from_request(&headers, input.criteria.as_ref())?;

    let gate = BudgetGate {
        budgets: &policy.budgets,
        metrics: &state.audit.metrics,
    };
    let submitted = submit_chat(
        gate,
        &served,
        input.messages.clone(),
        &input.params,
        input.top_logprobs,
        &request_id,
        audit,
    )
    .await?;
    let info = Served::local(&served.id);
    if input.params.stream {
        let stream = chat_stream(new_id(), served.id.clone(), submitted, input.params.include_usage, info.clone());
        return Ok(sse_response(stream, &info));
    }
    let collected = submitted.collect().await?;
    Ok(completion_response(new_id(), &served.id, collected, input.top_logprobs.is_some(), info))
}

/// Records the request's workflow and its prompt.
fn audit_request(audit: &AuditHandle, body: &ChatCompletionRequest) {
    super::audit::tag_workflow(audit, body.fields.metadata.as_ref(), body.fields.user.as_deref());
    let prompt: Vec<String> = body
        .messages
        .iter()
        .map(|m| match &m.content {
            Some(MessageContent::Text(text)) => format!("{}: {text}", m.role),
            Some(MessageContent::Parts(parts)) => {
                let text: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                format!("{}: {text}", m.role)
            }
            None => format!("{}:", m.role),
        })
        .collect();
    audit.set_prompt(&prompt.join("\n"));
}

/// A validated chat request, before it is sent to any tier.
pub(super) struct ChatInput {
    pub messages: Vec<ChatMessage>,
    pub params: Validated,
    /// Alternatives per token the client asked for, when it asked for log-probabilities.
    pub top_logprobs: Option<usize>,
    /// Fields as the client sent them, passed on to providers unchanged, so that a provider's
    /// own defaults apply to what the client left out.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub criteria: Option<CriteriaFields>,
}

impl ChatInput {
    pub fn parse(body: ChatCompletionRequest, policy: &Policy) -> Result<Self, ApiError> {
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
        let max_tokens = body.max_completion_tokens.or(body.fields.max_tokens);
        let temperature = body.fields.temperature;
        let top_p = body.fields.top_p;
        let override_max = body
            .max_completion_tokens
            .map(|value| (value, "max_completion_tokens"));
        let params = validate(body.fields, override_max, policy.config.server.default_max_tokens)?;
        Ok(Self {
            messages,
            params,
            top_logprobs,
            max_tokens,
            temperature,
            top_p,
            criteria: body.tierd,
        })
    }
}

/// A fresh completion id: clients may reuse their X-Request-Id, but completion ids must be unique.
pub(super) fn new_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

/// Renders `messages` with the model's chat template, checks the prompt against the workflow's
/// budget and the context length, and queues the generation.
pub(super) async fn submit_chat(
    gate: BudgetGate<'_>,
    served: &Arc<ServedModel>,
    messages: Vec<ChatMessage>,
    params: &Validated,
    logprobs: Option<usize>,
    request_id: &str,
    audit: Option<AuditHandle>,
) -> Result<Submitted, ApiError> {
    let prompt_tokens = tokenize_chat(served, messages).await?;
    check_budget(gate, audit.as_ref(), prompt_tokens.len(), "messages")?;
    check_context(prompt_tokens.len(), served.context_length, "messages")?;

    let max_tokens = params
        .max_tokens
        .min(served.context_length - prompt_tokens.len());
    let generation = GenerationRequest {
        request_id: request_id.to_string(),
        prompt_tokens,
        max_tokens,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        logprobs,
        produced: Default::default(),
    };
    submit(served, generation, audit)
}

/// Renders `messages` with the model's chat template and returns the prompt's tokens.
pub(super) async fn tokenize_chat(served: &Arc<ServedModel>, messages: Vec<ChatMessage>) -> Result<Vec<u32>, ApiError> {
    // Tokenizing a multi-megabyte prompt takes long enough to stall the async runtime, so it
    // runs on the blocking pool.
    let tokenizing = served.clone();
    let rendered = tokio::task::spawn_blocking(move || tokenizing.chat_prompt(&messages))
        .await
        .map_err(ApiError::internal)?;
    match rendered {
        Ok(Some(tokens)) => Ok(tokens),
        Ok(None) => Err(ApiError::invalid_request(
            format!(
                "The model `{}` has no chat template; use /v1/completions or set `chat_template` in the config.",
                served.id
            ),
            Some("model"),
        )),
        Err(message) => Err(ApiError::invalid_request(message, Some("messages"))),
    }
}

/// Sends `stream` as server-sent events, with `served` in the response headers.
pub(super) fn sse_response(
    stream: impl Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
    served: &Served,
) -> Response {
    let mut response = Sse::new(stream).into_response();
    served.write_headers(response.headers_mut());
    response
}

/// Builds the non-streamed response for a local completion. `logprobs` is whether the client
/// requested them, because the completion may carry log-probabilities computed for routing only.
pub(super) fn completion_response(id: String, model: &str, collected: Collected, logprobs: bool, served: Served) -> Response {
    let logprobs = logprobs.then(|| ChatLogprobs {
        content: collected.logprobs.iter().map(chat_logprob).collect(),
    });
    let response = ChatCompletion {
        id,
        object: "chat.completion",
        created: unix_time(),
        model: model.to_string(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: collected.text,
            },
            logprobs,
            finish_reason: Cow::Borrowed(collected.finish_reason),
        }],
        usage: collected.usage,
        tierd: served.clone(),
    };
    let mut response = axum::Json(response).into_response();
    served.write_headers(response.headers_mut());
    response
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

pub(super) fn chat_logprob(token: &TokenLogprob) -> ChatTokenLogprob {
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

/// Builder of the chunks of one streamed completion. The first chunk carries `served`.
pub(super) struct ChunkWriter {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    served: Option<Served>,
}

impl ChunkWriter {
    pub fn new(id: String, model: String, include_usage: bool, served: Served) -> Self {
        Self {
            id,
            model,
            created: unix_time(),
            include_usage,
            served: Some(served),
        }
    }

    pub fn chunk(&mut self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        super::sse_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage: self.include_usage.then_some(usage),
            tierd: self.served.take(),
        })
    }

    /// Returns the first chunk, which names the role.
    pub fn role(&mut self) -> Event {
        let role = ChatChunkChoice {
            index: 0,
            delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
            logprobs: None,
            finish_reason: None,
        };
        self.chunk(vec![role], None)
    }

    pub fn delta(&mut self, text: String, logprobs: Option<ChatLogprobs>) -> Event {
        let choice = ChatChunkChoice {
            index: 0,
            delta: ChatDelta { role: None, content: Some(text) },
            logprobs,
            finish_reason: None,
        };
        self.chunk(vec![choice], None)
    }

    /// Returns the closing chunks: the finish reason, the usage when the client requested it,
    /// and `[DONE]`.
    pub fn finish(&mut self, reason: Cow<'static, str>, usage: Option<Usage>) -> Vec<Event> {
        let choice = ChatChunkChoice {
            index: 0,
            delta: ChatDelta::default(),
            logprobs: None,
            finish_reason: Some(reason),
        };
        let mut events = vec![self.chunk(vec![choice], None)];
        if let (true, Some(usage)) = (self.include_usage, usage) {
            events.push(self.chunk(Vec::new(), Some(usage)));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }
}

fn chat_stream(
    id: String,
    model: String,
    mut submitted: Submitted,
    include_usage: bool,
    served: Served,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let mut writer = ChunkWriter::new(id, model, include_usage, served);
    async_stream::stream! {
        yield Ok(writer.role());

        let mut completion = String::new();
        while let Some(event) = submitted.events.recv().await {
            match event {
                GenerationEvent::Delta { text, logprobs } => {
                    let logprobs = (!logprobs.is_empty()).then(|| ChatLogprobs {
                        content: logprobs.iter().map(chat_logprob).collect(),
                    });
                    completion.push_str(&text);
                    yield Ok(writer.delta(text, logprobs));
                }
                GenerationEvent::Finished { reason, prompt_tokens, cached_tokens, completion_tokens, timings } => {
                    submitted.log_finished(reason.as_str(), prompt_tokens, cached_tokens, completion_tokens, &timings);
                    submitted.record_finished(prompt_tokens, completion_tokens, &timings, &completion);
                    let usage = Usage::new(prompt_tokens, completion_tokens).with_cached(cached_tokens);
                    for event in writer.finish(Cow::Borrowed(reason.as_str()), Some(usage)) {
                        yield Ok(event);
                    }
                    return;
                }
                GenerationEvent::Failed(message) => {
                    submitted.record_failed(&message);
                    yield Ok(super::sse_json(&ApiError::internal(message).body()));
                    return;
                }
            }
        }
        // The worker ended without a final event: end with an error, never a clean [DONE].
        yield Ok(super::sse_json(&ApiError::internal("generation ended without finishing").body()));
    }
}
