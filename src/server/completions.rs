//! `POST /v1/completions` (legacy text completions).

use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde_json::Value;

use super::error::ApiError;
use super::json::ApiJson;
use super::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, PromptField, Usage};
use super::params::{check_context, reject_unsupported, validate};
use super::budget::{check_budget, BudgetGate};
use super::served::Served;
use crate::audit::handle::AuditHandle;
use super::{submit, unix_time, AppState, Submitted, SYSTEM_FINGERPRINT};
use crate::engine::{GenerationEvent, GenerationRequest, TokenLogprob};

/// The legacy API returns at most five alternatives per token.
const MAX_LEGACY_LOGPROBS: u64 = 5;

pub async fn completions(
    State(state): State<Arc<AppState>>,
    request_id: axum::Extension<super::RequestId>,
    audit: Option<axum::Extension<AuditHandle>>,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let audit = audit.map(|handle| handle.0);
    let policy = state.policy();
    if let Some(audit) = &audit {
        super::audit::tag_workflow(audit, body.fields.metadata.as_ref(), body.fields.user.as_deref());
    }
    let registry = state.registry()?;
    let served = registry
        .get(&body.model)
        .ok_or_else(|| ApiError::model_not_found(&body.model))?;

    reject_unsupported("best_of", &body.best_of, &[serde_json::json!(1)])?;
    if body.suffix.is_some() {
        return Err(ApiError::invalid_request("`suffix` is not supported.", Some("suffix")));
    }
    let echo = body.echo.unwrap_or(false);
    let logprobs = match body.logprobs {
        Some(count) if count > MAX_LEGACY_LOGPROBS => {
            return Err(ApiError::invalid_request(
                format!("Invalid value for `logprobs`: {count}; it must be at most {MAX_LEGACY_LOGPROBS}."),
                Some("logprobs"),
            ))
        }
        Some(_) if echo => {
            return Err(ApiError::invalid_request(
                "`echo` together with `logprobs` is not supported.",
                Some("echo"),
            ))
        }
        Some(count) => Some(count as usize),
        None => None,
    };

    let (prompt_text, prompt_tokens) = match body.prompt {
        PromptField::Text(text) => encode_blocking(&served, text).await?,
        PromptField::Texts(mut texts) if texts.len() == 1 => encode_blocking(&served, texts.remove(0)).await?,
        PromptField::Texts(texts) => {
            return Err(ApiError::invalid_request(
                format!("Invalid value for `prompt`: {} prompts given; send one prompt per request.", texts.len()),
                Some("prompt"),
            ))
        }
        PromptField::Tokens(tokens) => {
            let vocab = served.model.network.hparams().n_vocab;
            if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::invalid_request(
                    format!("Invalid value for `prompt`: token id {bad} is outside the vocabulary of {vocab} tokens."),
                    Some("prompt"),
                ));
            }
            let text = served
                .tokenizer()
                .decode(&tokens, false)
                .map_err(ApiError::internal)?;
            (text, tokens)
        }
    };
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid_request("`prompt` must not be empty.", Some("prompt")));
    }
    if let Some(audit) = &audit {
        audit.set_prompt(&prompt_text);
    }

    let params = validate(body.fields, None, policy.config.server.default_max_tokens)?;
    let gate = BudgetGate {
        budgets: &policy.budgets,
        metrics: &state.audit.metrics,
    };
    check_budget(gate, audit.as_ref(), prompt_tokens.len(), "prompt")?;
    check_context(prompt_tokens.len(), served.context_length, "prompt")?;
    let max_tokens = params
        .max_tokens
        .min(served.context_length - prompt_tokens.len());
    let generation = GenerationRequest {
        request_id: request_id.0 .0.clone(),
        prompt_tokens,
        max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        logprobs,
        produced: Default::default(),
    };
    let submitted = submit(&served, generation, audit)?;

    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let echo_text = echo.then_some(prompt_text);
    if params.stream {
        let stream = completion_stream(id, served.id.clone(), submitted, params.include_usage, echo_text);
        let mut response = Sse::new(stream).into_response();
        Served::local(&served.id).write_headers(response.headers_mut());
        return Ok(response);
    }

    let collected = submitted.collect().await?;
    let mut text = echo_text.unwrap_or_default();
    let offset = text.len();
    text.push_str(&collected.text);
    let response = Completion {
        id,
        object: "text_completion",
        created: unix_time(),
        model: served.id.clone(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: logprobs.map(|_| legacy_logprobs(&collected.logprobs, offset)),
            finish_reason: Some(collected.finish_reason),
        }],
        usage: Some(Some(collected.usage)),
    };
    let mut response = axum::Json(response).into_response();
    // Legacy completions always run on a local model, so the headers alone report it.
    Served::local(&served.id).write_headers(response.headers_mut());
    Ok(response)
}

/// Tokenizes a prompt on the blocking pool, because a multi-megabyte prompt takes long enough
/// to stall the async runtime.
async fn encode_blocking(
    served: &Arc<crate::registry::ServedModel>,
    text: String,
) -> Result<(String, Vec<u32>), ApiError> {
    let tokenizing = served.clone();
    tokio::task::spawn_blocking(move || {
        let tokens = tokenizing.encode(&text, true)?;
        Ok::<_, String>((text, tokens))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)
}

fn legacy_logprobs(tokens: &[TokenLogprob], start_offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = start_offset;
    for token in tokens {
        out.tokens.push(token.token.clone());
        out.token_logprobs.push(token.logprob);
        out.top_logprobs.push(
            token
                .top
                .iter()
                .map(|(text, logprob, _)| (text.clone(), Value::from(*logprob)))
                .collect(),
        );
        out.text_offset.push(offset);
        offset += token.token.len();
    }
    out
}

fn completion_stream(
    id: String,
    model: String,
    mut submitted: Submitted,
    include_usage: bool,
    echo: Option<String>,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let created = unix_time();
    let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices,
        usage: include_usage.then_some(usage),
    };
    let choice = |text: String, logprobs: Option<CompletionLogprobs>, finish: Option<&'static str>| {
        CompletionChoice {
            index: 0,
            text,
            logprobs,
            finish_reason: finish,
        }
    };

    async_stream::stream! {
        let mut offset = 0;
        let mut completion = String::new();
        if let Some(text) = echo {
            offset = text.len();
            yield Ok(super::sse_json(&chunk(vec![choice(text, None, None)], None)));
        }
        while let Some(event) = submitted.events.recv().await {
            match event {
                GenerationEvent::Delta { text, logprobs } => {
                    let legacy = (!logprobs.is_empty()).then(|| legacy_logprobs(&logprobs, offset));
                    offset += text.len();
                    completion.push_str(&text);
                    yield Ok(super::sse_json(&chunk(vec![choice(text, legacy, None)], None)));
                }
                GenerationEvent::Finished { reason, prompt_tokens, cached_tokens, completion_tokens, timings } => {
                    submitted.log_finished(reason.as_str(), prompt_tokens, cached_tokens, completion_tokens, &timings);
                    submitted.record_finished(prompt_tokens, completion_tokens, &timings, &completion);
                    let last = choice(String::new(), None, Some(reason.as_str()));
                    yield Ok(super::sse_json(&chunk(vec![last], None)));
                    if include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens).with_cached(cached_tokens);
                        yield Ok(super::sse_json(&chunk(Vec::new(), Some(usage))));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
                GenerationEvent::Failed(message) => {
                    submitted.record_failed(&message);
                    yield Ok(super::sse_json(&ApiError::internal(message).body()));
                    return;
                }
            }
        }
        yield Ok(super::sse_json(&ApiError::internal("generation ended without finishing").body()));
    }
}
