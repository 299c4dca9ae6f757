//! Chat requests for a route (a model name such as `auto`): the route decides whether the
//! local model serves the request or it escalates to a provider.
//!
//! The decision, in order:
//!
//! 1. Pre-routing routes classify the last user message with the route task, and the label's
//!    tier decides where the request goes. Cascade routes always start locally.
//! 2. A local completion is kept when its confidence reaches the threshold: the route's own
//!    for a cascade, the request's `min_confidence` for either mode.
//! 3. An escalation passes `routing::gate::clear`: restricted requests, personal data under a
//!    `local` PII policy, a maximum tier that excludes every remote model, or a latency budget
//!    too short for the provider keep the request local, and the response gives the reason.
//! 4. The provider chain serves the request, with retries and fallback. When every provider
//!    fails, the local completion is returned and flagged (or 502 without `local_fallback`).
//!
//! Judging a local completion needs all of it, so a routed stream starts once the local
//! completion is done. An escalated stream is relayed as the provider sends it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

use super::budget::{check_budget, BudgetGate};
use super::chat::{
    chat_logprob, completion_response, new_id, sse_response, submit_chat, tokenize_chat, ChatInput, ChunkWriter,
};
use super::classify::classify_error;
use super::error::ApiError;
use super::openai::{AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChatLogprobs, Usage};
use super::served::Served;
use super::{unix_time, AppState, Collected, SYSTEM_FINGERPRINT};
use crate::audit::handle::AuditHandle;
use crate::engine::ChatMessage;
use crate::policy::Policy;
use crate::providers::{ChatRequest, ChatStream, StreamEvent};
use crate::registry::ServedModel;
use crate::routing::confidence::{answer_confidence, TOP_LOGPROBS_NEEDED};
use crate::routing::config::RouteMode;
use crate::routing::criteria::Criteria;
use crate::routing::gate::{self, Candidate, Cleared, Escalation, KeptLocal};
use crate::routing::pii::{detect, Detection};
use crate::routing::resilience::{self, ChainError};
use crate::routing::route::Route;
use crate::routing::upstreams::Upstreams;

/// A complete local completion and its confidence.
struct LocalAnswer {
    collected: Collected,
    confidence: f64,
}

/// Everything a routed request carries from one step to the next.
struct Routed<'a> {
    state: &'a Arc<AppState>,
    /// The policy in force when the request arrived, kept to its end.
    policy: &'a Arc<Policy>,
    route: &'a Route,
    request_id: &'a str,
    arrived: Instant,
    input: ChatInput,
    criteria: Criteria,
    local: Arc<ServedModel>,
    /// Personal data found in each message, by message index.
    pii: Vec<Detection>,
    /// Personal data found in each stop sequence, which providers also receive.
    stop_pii: Vec<Detection>,
    served: Served,
    audit: Option<AuditHandle>,
    /// The local model's error when it could not take the request.
    local_error: Option<ApiError>,
}

pub async fn chat(
    state: &Arc<AppState>,
    policy: &Arc<Policy>,
    route: &Route,
    request_id: &str,
    audit: Option<AuditHandle>,
    headers: &HeaderMap,
    body: ChatCompletionRequest,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let input = ChatInput::parse(body, policy)?;
    let criteria = Criteria::from_request(headers, input.criteria.as_ref())?;
    let local = state.registry()?.get(&route.config.local).ok_or_else(|| {
        ApiError::internal(format!(
            "route `{}`: its local model `{}` is not served",
            route.name(),
            route.config.local
        ))
    })?;

    let pii: Vec<Detection> = input.messages.iter().map(|m| detect(&m.content)).collect();
    let stop_pii: Vec<Detection> = input.params.stop.iter().map(|stop| detect(stop)).collect();
    let mut served = Served::local(&local.id);
    served.route = Some(route.name().to_string());
    served.confidence_metric = Some(route.config.confidence.as_str());
    served.pii = pii_kinds(pii.iter().chain(&stop_pii));

    let mut routed = Routed {
        state,
        policy,
        route,
        request_id,
        arrived,
        input,
        criteria,
        local,
        pii,
        stop_pii,
        served,
        audit,
        local_error: None,
    };
    routed.run().await
}

impl Routed<'_> {
    fn budget_gate(&self) -> BudgetGate<'_> {
        BudgetGate {
            budgets: &self.policy.budgets,
            metrics: &self.state.audit.metrics,
        }
    }

    async fn run(&mut self) -> Result<Response, ApiError> {
        let threshold = match self.route.config.mode {
            RouteMode::Cascade => Some(self.criteria.min_confidence.unwrap_or(self.route.config.threshold)),
            RouteMode::PreRoute => match self.pre_route().await? {
                3 => self.criteria.min_confidence,
                tier => {
                    // The prompt goes to a provider without local generation, so its budget is
                    // checked here, in the local model's tokens.
                    let tokens = tokenize_chat(&self.local, self.input.messages.clone()).await?;
                    check_budget(self.budget_gate(), self.audit.as_ref(), tokens.len(), "messages")?;
                    return self.escalate_or_keep(Escalation::PreRoute, self.route.candidates(tier), None).await;
                }
            },
        };
        let answer = match self.answer_locally().await {
            Ok(answer) => answer,
            Err(error) if local_unavailable(&error) => {
                tracing::info!(route = self.route.name(), status = error.status.as_u16(), message = %error.message.escape_debug(), "the local model cannot take the request; escalating");
                self.local_error = Some(error);
                let candidates = self.route.cascade_candidates();
                return self.escalate_or_keep(Escalation::LocalUnavailable, candidates, None).await;
            }
            Err(error) => return Err(error),
        };
        if !self.needs_escalation(&answer, threshold) {
            return Ok(self.reply_local(answer));
        }
        self.escalate_or_keep(Escalation::LowConfidence, self.route.cascade_candidates(), Some(answer))
            .await
    }

    /// Sends the request to `candidates` if the gate allows, and otherwise serves it locally.
    async fn escalate_or_keep(
        &mut self,
        escalation: Escalation,
        candidates: Vec<Candidate>,
        answer: Option<LocalAnswer>,
    ) -> Result<Response, ApiError> {
        self.served.escalation = Some(escalation);

        let contains_pii = !self.served.pii.is_empty();
        let cleared = gate::clear(
            &self.criteria,
            &candidates,
            contains_pii,
            self.route.config.pii,
            &self.policy.upstreams,
            self.arrived.elapsed(),
        );
        match cleared {
            Ok(cleared) => self.escalate(cleared, &candidates, answer).await,
            Err(kept) => {
                tracing::info!(route = self.route.name(), reason = kept.as_str(), "kept the request local");
                self.keep_local(kept, answer).await
            }
        }
    }

    /// Generates the local completion, with the log-probabilities its confidence needs.
    async fn answer_locally(&mut self) -> Result<LocalAnswer, ApiError> {
        let logprobs = self.input.top_logprobs.unwrap_or(0).max(TOP_LOGPROBS_NEEDED);
        let submitted = submit_chat(
            self.budget_gate(),
            &self.local,
            self.input.messages.clone(),
            &self.input.params,
            Some(logprobs),
            self.request_id,
            self.audit.clone(),
        )
        .await?;
        let collected = submitted.collect().await?;
        let confidence = answer_confidence(self.route.config.confidence, &collected.logprobs);
        self.served.confidence = Some(confidence);
        Ok(LocalAnswer {
            collected,
            confidence,
        })
    }

    /// Returns whether `answer` falls short of `threshold`, and records the threshold.
    fn needs_escalation(&mut self, answer: &LocalAnswer, threshold: Option<f64>) -> bool {
        self.served.threshold = threshold;
        threshold.is_some_and(|threshold| answer.confidence < threshold)
    }

    /// Classifies the request with the route task and returns the tier its label maps to.
    async fn pre_route(&mut self) -> Result<u8, ApiError> {
        let config = &self.route.config;
        let task = self.state.tasks()?.get(&config.route_task).ok_or_else(|| {
            ApiError::internal(format!(
                "route `{}`: its route task `{}` is not loaded",
                config.name, config.route_task
            ))
        })?;
        let messages = &self.input.messages;
        let text = messages
            .iter()
            .rev()
            .find(|m| m.role == "user" && !m.content.trim().is_empty())
            .map(|m| m.content.clone());
        let Some(text) = text else {
            // Nothing to classify, such as a request of system messages only: the local model
            // serves it.
            return Ok(3);
        };
        let classification = task.classify(vec![text]).await.map_err(classify_error)?;
        let Some(result) = classification.results.into_iter().next() else {
            return Err(ApiError::internal("the route task returned no result"));
        };
        let tier = config.route_tiers.get(&result.label).copied().unwrap_or_else(|| {
            tracing::warn!(route = %config.name, label = %result.label, "route label has no tier in `route_tiers`; serving the request locally");
            3
        });
        tracing::info!(route = %config.name, label = %result.label, confidence = result.confidence, tier, "pre-routed the request");
        self.served.route_label = Some(result.label);
        self.served.route_confidence = Some(result.confidence);
        Ok(tier)
    }

    /// Serves the request locally although it would have escalated, and records why.
    async fn keep_local(&mut self, kept: KeptLocal, answer: Option<LocalAnswer>) -> Result<Response, ApiError> {
        self.served.kept_local = Some(kept);
        let answer = match (answer, self.local_error.take()) {
            (Some(answer), _) => answer,
            // The local model already failed to take the request, so its error is returned.
            (None, Some(error)) => return Err(error),
            (None, None) => self.answer_locally().await?,
        };
        Ok(self.reply_local(answer))
    }

    async fn escalate(
        &mut self,
        cleared: Cleared,
        candidates: &[Candidate],
        answer: Option<LocalAnswer>,
    ) -> Result<Response, ApiError> {
        let request = self.provider_request(cleared.redact);
        self.served.redacted = cleared.redact;
        let chain = self.policy.upstreams.chain(&cleared.models);
        let limit = cleared.remaining;

        let outcome = if self.input.params.stream {
            match within(limit, chain.chat_stream(&request)).await {
                Ok((stream, via)) => {
                    self.mark_remote(&via, candidates, answer.as_ref());
                    return Ok(self.relay_stream(stream, request.messages));
                }
                Err(failure) => failure,
            }
        } else {
            match within(limit, chain.chat(&request)).await {
                Ok((result, via)) => {
                    self.policy.upstreams.record_latency(&via.provider, &via.model, result.timing.total);
                    self.mark_remote(&via, candidates, answer.as_ref());
                    return Ok(self.reply_remote(result));
                }
                Err(failure) => failure,
            }
        };

        let kept = match &outcome {
            Failure::Deadline => KeptLocal::LatencyBudget,
            Failure::Chain(_) => KeptLocal::ProvidersFailed,
        };
        self.served.failed = outcome.describe();
        self.served.redacted = false;
        tracing::warn!(route = self.route.name(), failures = ?self.served.failed, "escalation failed");
        if !self.route.config.local_fallback {
            return Err(ApiError::bad_gateway(
                format!(
                    "Route `{}` escalated the request, and no provider answered: {}.",
                    self.route.name(),
                    self.served.failed.join("; ")
                ),
                "provider_failed",
            ));
        }
        self.keep_local(kept, answer).await
    }

    /// Builds the request that providers get, with personal data replaced when `redact_pii` is set.
    fn provider_request(&self, redact_pii: bool) -> ChatRequest {
        let messages = self
            .input
            .messages
            .iter()
            .zip(&self.pii)
            .map(|(message, found)| ChatMessage {
                role: message.role.clone(),
                content: if redact_pii && !found.is_empty() {
                    found.redacted()
                } else {
                    message.content.clone()
                },
            })
            .collect();
        let stop = self
            .input
            .params
            .stop
            .iter()
            .zip(&self.stop_pii)
            .map(|(stop, found)| if redact_pii && !found.is_empty() { found.redacted() } else { stop.clone() })
            .collect();
        ChatRequest {
            messages,
            max_tokens: self.input.max_tokens,
            temperature: self.input.temperature,
            top_p: self.input.top_p,
            stop,
            stream_usage: true,
        }
    }

    /// Records in `served` which provider served the request.
    fn mark_remote(&mut self, via: &resilience::Served, candidates: &[Candidate], answer: Option<&LocalAnswer>) {
        let tier = candidates
            .iter()
            .find(|c| c.model.provider == via.provider && c.model.model == via.model)
            .map_or(1, |c| c.tier);
        let served = &mut self.served;
        served.tier = tier;
        served.provider = via.provider.clone();
        served.model = via.model.clone();
        served.local_confidence = answer.map(|a| a.confidence);
        served.confidence = None;
        served.attempts = Some(via.attempts);
        served.failed = via.fell_back_from.iter().map(ToString::to_string).collect();
        tracing::info!(
            route = self.route.name(),
            provider = %via.provider,
            model = %via.model,
            tier,
            attempts = via.attempts,
            "escalated the request"
        );
    }

    /// Writes the routing decision into the audit record.
    fn audit_decision(&self) {
        let Some(audit) = &self.audit else { return };
        let served = &self.served;
        audit.update(|record| {
            record.route = served.route.clone();
            record.tier = served.tier;
            record.provider = served.provider.clone();
            record.model = served.model.clone();
            record.confidence = served.confidence.or(served.local_confidence);
            record.escalation = served.escalation.map(|e| e.as_str().to_string());
            record.kept_local = served.kept_local.map(|k| k.as_str().to_string());
        });
    }

    fn reply_local(&self, mut answer: LocalAnswer) -> Response {
        self.audit_decision();
        // The completion carries the alternatives the confidence needed, so keep the client's count.
        let wanted = self.input.top_logprobs;
        for token in &mut answer.collected.logprobs {
            token.top.truncate(wanted.unwrap_or(0));
        }
        let served = self.served.clone();
        if !self.input.params.stream {
            return completion_response(new_id(), &self.local.id, answer.collected, wanted.is_some(), served);
        }

        let collected = answer.collected;
        let logprobs = wanted.map(|_| ChatLogprobs {
            content: collected.logprobs.iter().map(chat_logprob).collect(),
        });
        let mut writer = ChunkWriter::new(new_id(), self.local.id.clone(), self.input.params.include_usage, served.clone());
        let mut events = vec![writer.role()];
        if !collected.text.is_empty() || logprobs.is_some() {
            events.push(writer.delta(collected.text, logprobs));
        }
        events.extend(writer.finish(Cow::Borrowed(collected.finish_reason), Some(collected.usage)));
        let stream = futures::stream::iter(events.into_iter().map(Ok));
        sse_response(stream, &served)
    }

    fn reply_remote(&self, result: crate::providers::ChatResult) -> Response {
        self.audit_decision();
        if let Some(audit) = &self.audit {
            let (usage, took) = (result.usage, result.timing.total);
            audit.update(|record| {
                record.input_tokens = usage.prompt_tokens;
                record.output_tokens = usage.completion_tokens;
                record.upstream_ms = Some(took.as_secs_f64() * 1000.0);
            });
            audit.set_completion(&result.text);
        }
        let usage: Usage = result.usage.into();
        let response = ChatCompletion {
            id: new_id(),
            object: "chat.completion",
            created: unix_time(),
            model: self.served.model.clone(),
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: result.text,
                },
                logprobs: None,
                finish_reason: Cow::Owned(result.finish_reason),
            }],
            usage,
            tierd: self.served.clone(),
        };
        let mut response = axum::Json(response).into_response();
        self.served.write_headers(response.headers_mut());
        response
    }

    /// Relays `stream`, the provider's response to `messages`.
    fn relay_stream(&self, stream: ChatStream, messages: Vec<ChatMessage>) -> Response {
        self.audit_decision();
        let writer = ChunkWriter::new(
            new_id(),
            self.served.model.clone(),
            self.input.params.include_usage,
            self.served.clone(),
        );
        let cut = CutGuard {
            audit: self.audit.clone(),
            finished: false,
            local: self.local.clone(),
            messages,
            relayed: String::new(),
        };
        let events = relay(
            self.policy.upstreams.clone(),
            stream,
            writer,
            cut,
            self.served.provider.clone(),
            self.served.model.clone(),
            self.arrived,
        );
        sse_response(events, &self.served)
    }
}

/// Relays a provider's stream as chat completion chunks. A failure after the stream started
/// ends it with an error event and no `[DONE]`, so the client sees the cut.
fn relay(
    upstreams: Arc<Upstreams>,
    mut stream: ChatStream,
    mut writer: ChunkWriter,
    mut cut: CutGuard,
    provider: String,
    model: String,
    sent: Instant,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let audit = cut.audit.clone();
    async_stream::stream! {
        yield Ok(writer.role());
        while let Some(item) = stream.next().await {
            match item {
                Ok(StreamEvent::Delta { text }) => {
                    cut.relayed.push_str(&text);
                    yield Ok(writer.delta(text, None));
                }
                Ok(StreamEvent::Finished { finish_reason, usage }) => {
                    cut.finish();
                    upstreams.record_latency(&provider, &model, sent.elapsed());
                    if let Some(audit) = &audit {
                        let took = sent.elapsed().as_secs_f64() * 1000.0;
                        audit.update(|record| {
                            if let Some(usage) = usage {
                                record.input_tokens = usage.prompt_tokens;
                                record.output_tokens = usage.completion_tokens;
                            }
                            record.upstream_ms = Some(took);
                        });
                        audit.set_completion(&cut.relayed);
                        // A provider that ignores `stream_options.include_usage` reports no
                        // usage, and the record would keep the local attempt's counts.
                        if usage.is_none() {
                            tracing::info!(%provider, %model, "the provider stream reported no usage; counting tokens locally");
                            cut.count_tokens(audit.clone());
                        }
                    }
                    for event in writer.finish(Cow::Owned(finish_reason), usage.map(Usage::from)) {
                        yield Ok(event);
                    }
                    return;
                }
                Err(error) => {
                    cut.finish();
                    if let Some(audit) = &audit {
                        let message = format!("the provider stream failed after it started: {error}");
                        audit.update(|record| {
                            record.status = 502;
                            record.error = Some(message);
                        });
                    }
                    tracing::warn!(%provider, %model, %error, "provider stream failed after it started");
                    let error = ApiError::bad_gateway(
                        format!("The stream from provider `{provider}` failed after it started: {error}"),
                        "upstream_stream_failed",
                    );
                    yield Ok(super::sse_json(&error.body()));
                    return;
                }
            }
        }
        let error = ApiError::bad_gateway(format!("The stream from provider `{provider}` ended without finishing."), "upstream_stream_failed");
        yield Ok(super::sse_json(&error.body()));
    }
}

/// Marks the audit record of a relayed stream that the client left before its end.
///
/// Providers report usage only in their terminal event. So the tokens of a cut stream, or of a
/// stream without usage, are counted with the local model's tokenizer: the prompt as the
/// provider received it, and the text relayed so far. Both counts are estimates, and the record
/// of a cut stream says so in its error.
struct CutGuard {
    audit: Option<AuditHandle>,
    finished: bool,
    /// The route's local model, whose tokenizer counts the tokens.
    local: Arc<ServedModel>,
    /// The messages sent to the provider.
    messages: Vec<ChatMessage>,
    /// The text relayed to the client so far.
    relayed: String,
}

impl CutGuard {
    fn finish(&mut self) {
        self.finished = true;
    }

    /// Writes the local tokenizer's counts of the prompt and of the relayed text into `audit`.
    /// Tokenizing a long prompt would stall the async runtime, so it runs on the blocking pool.
    /// The task holds the audit handle, which delays the record's write until it has counted.
    fn count_tokens(&mut self, audit: AuditHandle) {
        let (local, messages, relayed) = (
            self.local.clone(),
            std::mem::take(&mut self.messages),
            self.relayed.clone(),
        );
        let count = move || {
            let input = local.chat_prompt(&messages).ok().flatten().map_or(0, |tokens| tokens.len());
            let output = local.encode(&relayed, false).map_or(0, |tokens| tokens.len());
            audit.update(|record| {
                record.input_tokens = input as u64;
                record.output_tokens = output as u64;
            });
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(count)),
            Err(_) => count(),
        }
    }
}

impl Drop for CutGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(audit) = self.audit.take() else { return };
        audit.update(|record| {
            record.status = super::CLIENT_CLOSED;
            record.error = Some(
                "the client closed the connection before the stream ended; the token counts are \
                 estimates from the local model's tokenizer"
                    .into(),
            );
        });
        self.count_tokens(audit);
    }
}

/// Failure of an escalation.
enum Failure {
    Chain(ChainError),
    /// The request's latency budget ran out first.
    Deadline,
}

impl Failure {
    fn describe(&self) -> Vec<String> {
        match self {
            Failure::Deadline => vec!["the latency budget ran out before a provider answered".into()],
            Failure::Chain(ChainError::AllFailed { failures }) => failures.iter().map(ToString::to_string).collect(),
            Failure::Chain(error) => vec![error.to_string()],
        }
    }
}

/// Returns whether `error` means the local model cannot take the request (a full queue, or a
/// prompt longer than its context) rather than that the request is invalid.
fn local_unavailable(error: &ApiError) -> bool {
    error.status == axum::http::StatusCode::TOO_MANY_REQUESTS || error.code == Some("context_length_exceeded")
}

/// Runs `call` within `limit`, when there is one.
async fn within<T>(
    limit: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, ChainError>>,
) -> Result<T, Failure> {
    match limit {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(Failure::Chain),
            Err(_) => Err(Failure::Deadline),
        },
        None => call.await.map_err(Failure::Chain),
    }
}

/// Returns the distinct kinds of personal data found, in a stable order.
fn pii_kinds<'a>(found: impl Iterator<Item = &'a Detection>) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = found.flat_map(|d| &d.matches).map(|m| m.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
}
