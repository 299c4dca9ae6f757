//! Escalation of classify results below the threshold to the task's remote models, after the
//! gate: what each result reports about it, and the 502 error when it fails.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::error::ApiError;
use crate::classify::task::ClassifyResult;
use crate::classify::Task;
use crate::providers::ProviderError;
use crate::routing::config::EscalationConfig;
use crate::routing::criteria::Criteria;
use crate::routing::gate::{self, Candidate, Escalation, KeptLocal};
use crate::routing::label_escalation::{ask_label, candidates, LabelAnswer, LabelEscalationError};
use crate::routing::label_prompt::label_request;
use crate::routing::pii::detect;
use crate::routing::resilience::{ChainError, FailureReason, ProviderFailure};
use crate::routing::upstreams::Upstreams;

/// Escalations of one request that are in flight at once.
const MAX_CONCURRENT_ESCALATIONS: usize = 8;

/// Serving decision for one result.
#[derive(Debug)]
pub enum Outcome {
    /// The local result, because it reached the threshold or the task has no escalation.
    Local,
    /// The local result of an input that should have escalated but was not sent.
    KeptLocal(KeptLocal),
    /// A label picked by a remote model.
    Escalated { label: String, report: EscalationReport },
}

/// The `escalation` object of a result that a remote model labelled.
#[derive(Debug, Serialize)]
pub struct EscalationReport {
    pub provider: String,
    /// The model's configured `id`.
    pub model: String,
    pub tier: u8,
    pub reason: Escalation,
    /// Attempts at the serving model, including the successful one.
    pub attempts: u32,
    /// Models of the chain that failed, or were skipped, before the serving one.
    pub fallbacks: usize,
    /// Whether personal data was replaced by placeholders before sending.
    pub redacted: bool,
    pub local_label: String,
    pub local_confidence: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Price of the tokens at the model's configured prices.
    pub cost_usd: f64,
    /// Time of the successful attempt, in milliseconds.
    pub ms: f64,
}

/// Settings and state shared by the escalations of one request.
pub struct Escalator<'a> {
    pub task: &'a Task,
    pub escalate: &'a EscalationConfig,
    pub upstreams: &'a Upstreams,
    pub criteria: Criteria,
    /// When the request arrived, from which its latency budget runs.
    pub arrived: Instant,
    /// Results below this confidence escalate.
    pub threshold: f64,
}

impl Escalator<'_> {
    /// Decides how each of `results` is served, escalating those below the threshold. `inputs`
    /// are the texts of the results, in the same order. The first failed escalation fails the
    /// request, and dropping the future drops every request still in flight.
    pub async fn run(&self, results: &[ClassifyResult], inputs: &[String]) -> Result<Vec<Outcome>, ApiError> {
        let candidates = candidates(self.escalate, self.upstreams);
        // Collected first, because a stream over a lazy `map` of borrowing closures fails the
        // `Send` check of axum handlers ("implementation of `FnOnce` is not general enough",
        // rust-lang/rust#64552).
        let jobs: Vec<_> = results
            .iter()
            .zip(inputs)
            .map(|(result, text)| self.outcome(result, text, &candidates))
            .collect();
        futures::stream::iter(jobs)
            .buffered(MAX_CONCURRENT_ESCALATIONS)
            .try_collect()
            .await
    }

    async fn outcome(&self, result: &ClassifyResult, text: &str, candidates: &[Candidate]) -> Result<Outcome, ApiError> {
        if result.confidence >= self.threshold {
            return Ok(Outcome::Local);
        }
        let index = result.index;
        let pii = detect(text);
        let cleared = match gate::clear(
            &self.criteria,
            candidates,
            !pii.is_empty(),
            self.escalate.pii,
            self.upstreams,
            self.arrived.elapsed(),
        ) {
            Ok(cleared) => cleared,
            Err(reason) => {
                tracing::info!(task = %self.task.name, input = index, reason = reason.as_str(), "result kept local");
                return Ok(Outcome::KeptLocal(reason));
            }
        };

        let sent = if cleared.redact { pii.redacted() } else { text.to_string() };
        let task = self.task;
        let request = label_request(&task.name, task.description.as_deref(), &task.labels, &sent);
        let asking = ask_label(self.upstreams, &cleared.models, &request, &task.labels);
        let answered = match cleared.remaining {
            None => asking.await,
            Some(remaining) => match tokio::time::timeout(remaining, asking).await {
                Ok(answered) => answered,
                Err(_) => {
                    tracing::warn!(
                        task = %task.name,
                        input = index,
                        budget_left_ms = remaining.as_millis() as u64,
                        "escalation cancelled because the latency budget ran out; result kept local"
                    );
                    return Ok(Outcome::KeptLocal(KeptLocal::LatencyBudget));
                }
            },
        };
        let answer = answered.map_err(|error| escalation_error(index, &error))?;
        let label = self.task.labels[answer.label].name.clone();
        let report = self.report(result, answer, &label, cleared.redact);
        Ok(Outcome::Escalated { label, report })
    }

    fn report(&self, result: &ClassifyResult, answer: LabelAnswer, label: &str, redacted: bool) -> EscalationReport {
        let served = answer.served;
        let tier = self
            .upstreams
            .model(&crate::routing::config::ModelRef {
                provider: served.provider.clone(),
                model: served.model.clone(),
            })
            .map_or(0, |model| model.tier);
        tracing::info!(
            task = %self.task.name,
            input = result.index,
            provider = %served.provider,
            model = %served.model,
            attempts = served.attempts,
            fallbacks = served.fell_back_from.len(),
            redacted,
            ms = answer.took.as_millis() as u64,
            local_label = %result.label,
            label = %label,
            "result escalated"
        );
        EscalationReport {
            provider: served.provider,
            model: served.model,
            tier,
            reason: Escalation::LowConfidence,
            attempts: served.attempts,
            fallbacks: served.fell_back_from.len(),
            redacted,
            local_label: result.label.clone(),
            local_confidence: result.confidence,
            prompt_tokens: answer.usage.prompt_tokens,
            completion_tokens: answer.usage.completion_tokens,
            cost_usd: answer.cost_usd,
            ms: millis(answer.took),
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Maps a failed escalation to 502. The message names each provider and what it returned, but
/// not the text of a provider's error body, because that can quote credentials. The log has the
/// full error.
fn escalation_error(index: usize, error: &LabelEscalationError) -> ApiError {
    tracing::warn!(input = index, error = %error, "escalation failed");
    let (what, code) = match error {
        LabelEscalationError::NotALabel { .. } => (error.to_string(), "invalid_provider_answer"),
        LabelEscalationError::Chain(ChainError::EmptyChain) => {
            ("no configured model is left in the chain".to_string(), "provider_failed")
        }
        LabelEscalationError::Chain(ChainError::InvalidRequest {
            provider, model, error, ..
        }) => (
            format!("provider `{provider}` (model `{model}`) rejected the request with {}", summarize(error)),
            "provider_failed",
        ),
        LabelEscalationError::Chain(ChainError::AllFailed { failures }) => {
            let failures: Vec<String> = failures.iter().map(describe_failure).collect();
            (format!("every provider failed: {}", failures.join("; ")), "provider_failed")
        }
    };
    ApiError::bad_gateway(format!("Escalation of input {index} failed: {what}."), code)
}

fn describe_failure(failure: &ProviderFailure) -> String {
    let reason = match &failure.reason {
        FailureReason::BreakerOpen => "skipped because its circuit breaker is open".to_string(),
        FailureReason::Failed { error, attempts: 1 } => summarize(error),
        FailureReason::Failed { error, attempts } => format!("{} after {attempts} attempts", summarize(error)),
    };
    format!("`{}` (model `{}`): {reason}", failure.provider, failure.model)
}

/// Describes `error` without the provider's own message.
fn summarize(error: &ProviderError) -> String {
    match error {
        ProviderError::Status { status, .. } => format!("HTTP {}", status.as_u16()),
        ProviderError::Timeout { phase, limit } => format!("timed out ({phase} timeout of {} ms)", limit.as_millis()),
        ProviderError::Connect { .. } => "connection failed".into(),
        ProviderError::Request { .. } => "sending the request failed".into(),
        ProviderError::Malformed { what } => format!("malformed response ({what})"),
        ProviderError::StreamCut { .. } => "response cut short".into(),
        ProviderError::Upstream { kind, .. } => format!("error event ({})", kind.as_deref().unwrap_or("no type")),
        ProviderError::MissingKey { .. } | ProviderError::InvalidConfig(_) | ProviderError::UnknownModel { .. } => {
            format!("misconfigured: {error}")
        }
    }
}
