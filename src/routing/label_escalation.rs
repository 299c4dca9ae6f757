//! Escalation of one classification input: the task's remote models, and the request for a
//! label along their fallback chain.

use std::time::Duration;

use super::config::{EscalationConfig, ModelRef};
use super::gate::Candidate;
use super::label_prompt::{parse_label, LabelParseError};
use super::resilience::{ChainError, Served};
use super::upstreams::Upstreams;
use crate::classify::task::LabelInfo;
use crate::providers::{ChatRequest, Usage};

/// Returns the models of `escalate.to` with their tiers, in fallback order. Config validation
/// has rejected entries that name no configured model; any left are skipped.
pub fn candidates(escalate: &EscalationConfig, upstreams: &Upstreams) -> Vec<Candidate> {
    escalate
        .to
        .iter()
        .filter_map(|entry| {
            let model = ModelRef::parse(entry).ok()?;
            let tier = upstreams.model(&model)?.tier;
            Some(Candidate { model, tier })
        })
        .collect()
}

/// A label picked by a remote model.
#[derive(Debug)]
pub struct LabelAnswer {
    /// Index into the task's labels.
    pub label: usize,
    pub served: Served,
    pub usage: Usage,
    /// Price of `usage` at the configured prices of the serving model, in USD.
    pub cost_usd: f64,
    /// Time of the successful attempt, from sending it to the end of the response.
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelEscalationError {
    #[error(transparent)]
    Chain(#[from] ChainError),

    /// The provider answered, but not with a label name. `usage` and `cost_usd` are those of
    /// the answer, which is paid for all the same.
    #[error("provider `{provider}` (model `{model}`) returned an answer that names no label of the task: {source}")]
    NotALabel {
        provider: String,
        model: String,
        usage: Usage,
        cost_usd: f64,
        #[source]
        source: LabelParseError,
    },
}

/// Sends `request` along the chain of `models` and parses the answer as one of `labels`.
/// Records the answer time of the serving model, also when the answer names no label.
/// Dropping the future drops the HTTP request.
pub async fn ask_label(
    upstreams: &Upstreams,
    models: &[ModelRef],
    request: &ChatRequest,
    labels: &[LabelInfo],
) -> Result<LabelAnswer, LabelEscalationError> {
    let chain = upstreams.chain(models);
    let (result, served) = chain.chat(request).await?;
    upstreams.record_latency(&served.provider, &served.model, result.timing.total);

    let serving = ModelRef {
        provider: served.provider.clone(),
        model: served.model.clone(),
    };
    let cost_usd = upstreams.model(&serving).map_or(0.0, |model| model.cost_usd(&result.usage));
    let label = parse_label(&result.text, labels).map_err(|source| LabelEscalationError::NotALabel {
        provider: served.provider.clone(),
        model: served.model.clone(),
        usage: result.usage,
        cost_usd,
        source,
    })?;
    Ok(LabelAnswer {
        label,
        served,
        usage: result.usage,
        cost_usd,
        took: result.timing.total,
    })
}
