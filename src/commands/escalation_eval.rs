//! `tierd eval --escalate-to`: the value of escalating unsure results to a remote model.
//!
//! The remote model is asked about every example, not only those below some threshold, so
//! that one run gives the table for every threshold, including the accuracy and cost of
//! sending everything to the remote model. A threshold's row then counts the remote answer
//! and its cost for the examples whose local confidence is below it, and the local answer at
//! no cost for the rest.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::Serialize;

use crate::classify::dataset::Example;
use crate::classify::metrics::Prediction;
use crate::classify::Task;
use crate::config::Config;
use crate::routing::config::{ModelRef, PiiPolicy};
use crate::routing::criteria::Criteria;
use crate::routing::gate::{self, Candidate};
use crate::routing::label_escalation::{ask_label, LabelEscalationError};
use crate::routing::label_prompt::label_request;
use crate::routing::pii::detect;
use crate::routing::upstreams::Upstreams;

/// Requests to the remote model in flight at once.
const MAX_CONCURRENT_REQUESTS: usize = 8;
/// Responses between two progress lines.
const PROGRESS_EVERY: usize = 64;

/// The remote model's side of one example.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemoteAnswer {
    /// False also when the answer named no label.
    pub correct: bool,
    pub cost_usd: f64,
}

/// One example: the local result and, unless its personal data kept it local, the remote one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleOutcome {
    pub local_correct: bool,
    pub local_confidence: f64,
    pub remote: Option<RemoteAnswer>,
}

/// Accuracy and cost when examples below `threshold` escalate.
#[derive(Debug, Clone, Serialize)]
pub struct EscalationRow {
    pub threshold: f64,
    pub escalated: usize,
    /// Share of examples answered locally.
    pub local_share: f64,
    pub accuracy: f64,
    pub cost_usd: f64,
    /// `1 - cost_usd / frontier_cost_usd`; null when sending everything costs nothing.
    pub saving: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct EscalationReport {
    pub provider: String,
    pub model: String,
    /// Prices of the model, in USD per million tokens, from the config.
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Examples sent to the model: every one but those the PII policy keeps local.
    pub sent: usize,
    /// Examples with personal data that the task's `escalate.pii` policy (`local` when the
    /// task has no `[task.escalate]`) keeps local at every threshold.
    pub kept_local_pii: usize,
    /// Examples whose personal data was replaced by placeholders before sending.
    pub redacted: usize,
    /// Answers that named no label, counted as wrong.
    pub unparsable: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Accuracy when every example that may leave is answered by the model.
    pub frontier_accuracy: f64,
    /// Cost of sending every example that may leave to the model.
    pub frontier_cost_usd: f64,
    pub by_threshold: Vec<EscalationRow>,
    pub seconds: f64,
}

/// The remote model of `--escalate-to`, with its provider client.
pub struct EscalationTarget {
    model: ModelRef,
    candidate: Candidate,
    upstreams: Upstreams,
}

impl EscalationTarget {
    /// Finds `target` (`provider/model`) in the config's `[[provider]]` tables and creates the
    /// provider clients, so that a wrong name fails before the local models run.
    pub fn new(config: &Config, target: &str) -> anyhow::Result<Self> {
        let model = ModelRef::parse(target).map_err(|e| anyhow::anyhow!("--escalate-to: {e}"))?;
        crate::providers::validate_providers(&config.providers).map_err(anyhow::Error::msg)?;
        let tier = model
            .resolve(&config.providers)
            .map_err(|e| anyhow::anyhow!("--escalate-to {target}: {e}"))?;
        let resilience = config.resilience.to_config().map_err(anyhow::Error::msg)?;
        let upstreams = Upstreams::new(&config.providers, resilience)?;
        Ok(Self {
            candidate: Candidate {
                model: model.clone(),
                tier,
            },
            model,
            upstreams,
        })
    }
}

/// Asks `target` for the label of every example and builds the report. A failed request ends
/// the run with an error that names the example; an answer that names no label counts as wrong.
pub fn evaluate(
    target: &EscalationTarget,
    task: &Task,
    examples: &[Example],
    predictions: &[Prediction],
    thresholds: &[f64],
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<EscalationReport> {
    let model = &target.model;
    let upstreams = &target.upstreams;
    let prices = upstreams
        .model(model)
        .with_context(|| format!("--escalate-to {model}: the model is not configured"))?
        .clone();
    let pii_policy = task.escalate.as_ref().map_or(PiiPolicy::Local, |escalate| escalate.pii);
    let candidates = [target.candidate.clone()];

    let started = Instant::now();
    let mut kept_local_pii = 0;
    let mut redacted = 0;
    let mut requests = Vec::with_capacity(examples.len());
    for (index, example) in examples.iter().enumerate() {
        let pii = detect(&example.text);
        // Offline runs have no request criteria, so only the PII policy can keep one local.
        match gate::clear(&Criteria::default(), &candidates, !pii.is_empty(), pii_policy, upstreams, Duration::ZERO) {
            Err(_) => kept_local_pii += 1,
            Ok(cleared) => {
                let text = if cleared.redact {
                    redacted += 1;
                    pii.redacted()
                } else {
                    example.text.clone()
                };
                let request = label_request(&task.name, task.description.as_deref(), &task.labels, &text);
                requests.push((index, request));
            }
        }
    }

    let total = requests.len();
    let models = [model.clone()];
    let answers: Vec<_> = runtime.block_on(async {
        let mut answers = Vec::with_capacity(total);
        let mut stream = futures::stream::iter(requests.iter())
            .map(|(index, request)| async { (*index, ask_label(upstreams, &models, request, &task.labels).await) })
            .buffered(MAX_CONCURRENT_REQUESTS);
        while let Some(answer) = stream.next().await {
            answers.push(answer);
            if answers.len() % PROGRESS_EVERY == 0 || answers.len() == total {
                eprintln!("asked {model}: {} / {total} examples, {:.1} s", answers.len(), started.elapsed().as_secs_f64());
            }
        }
        answers
    });

    let mut outcomes: Vec<ExampleOutcome> = predictions
        .iter()
        .map(|prediction| ExampleOutcome {
            local_correct: prediction.is_correct(),
            local_confidence: prediction.confidence,
            remote: None,
        })
        .collect();
    let (mut prompt_tokens, mut completion_tokens, mut unparsable) = (0, 0, 0);
    for (index, answer) in answers {
        let truth = predictions[index].truth;
        let remote = match answer {
            Ok(answer) => {
                prompt_tokens += answer.usage.prompt_tokens;
                completion_tokens += answer.usage.completion_tokens;
                RemoteAnswer {
                    correct: answer.label == truth,
                    cost_usd: answer.cost_usd,
                }
            }
            Err(LabelEscalationError::NotALabel { usage, cost_usd, source, .. }) => {
                tracing::warn!(example = index, error = %source, "the remote answer names no label; counted as wrong");
                prompt_tokens += usage.prompt_tokens;
                completion_tokens += usage.completion_tokens;
                unparsable += 1;
                RemoteAnswer {
                    correct: false,
                    cost_usd,
                }
            }
            Err(error) => bail!("{}: asking {model} failed: {error}", examples[index].describe(index)),
        };
        outcomes[index].remote = Some(remote);
    }

    let frontier = frontier_only(&outcomes);
    Ok(EscalationReport {
        provider: model.provider.clone(),
        model: model.model.clone(),
        input_per_mtok: prices.input_per_mtok,
        output_per_mtok: prices.output_per_mtok,
        sent: total,
        kept_local_pii,
        redacted,
        unparsable,
        prompt_tokens,
        completion_tokens,
        frontier_accuracy: frontier.accuracy,
        frontier_cost_usd: frontier.cost_usd,
        by_threshold: thresholds.iter().map(|&threshold| row(&outcomes, threshold, frontier.cost_usd)).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Returns the row of `threshold`: examples whose local confidence is below it take the
/// remote answer and its cost, unless they were not sent.
pub fn row(outcomes: &[ExampleOutcome], threshold: f64, frontier_cost_usd: f64) -> EscalationRow {
    let (mut escalated, mut correct, mut cost_usd) = (0, 0, 0.0);
    for outcome in outcomes {
        match outcome.remote {
            Some(remote) if outcome.local_confidence < threshold => {
                escalated += 1;
                correct += usize::from(remote.correct);
                cost_usd += remote.cost_usd;
            }
            _ => correct += usize::from(outcome.local_correct),
        }
    }
    let count = outcomes.len().max(1) as f64;
    EscalationRow {
        threshold,
        escalated,
        local_share: 1.0 - escalated as f64 / count,
        accuracy: correct as f64 / count,
        cost_usd,
        saving: (frontier_cost_usd > 0.0).then(|| 1.0 - cost_usd / frontier_cost_usd),
    }
}

/// Accuracy and cost when every example that was sent takes the remote answer.
fn frontier_only(outcomes: &[ExampleOutcome]) -> EscalationRow {
    let row = row(outcomes, f64::INFINITY, 0.0);
    EscalationRow { saving: Some(0.0), ..row }
}

pub fn print_report(report: &EscalationReport) {
    println!(
        "escalation to {}/{}: asked about every example, so that the table shows every threshold and the \
         frontier-only figures from one run",
        report.provider, report.model
    );
    println!(
        "sent {}, kept local for personal data {}, redacted {}, answers naming no label {} (counted as wrong)",
        report.sent, report.kept_local_pii, report.redacted, report.unparsable
    );
    println!(
        "{} prompt and {} completion tokens at {:.2} and {:.2} USD per million; {:.1} s",
        report.prompt_tokens, report.completion_tokens, report.input_per_mtok, report.output_per_mtok, report.seconds
    );
    println!(
        "frontier only: accuracy {:.4}, cost {:.4} USD",
        report.frontier_accuracy, report.frontier_cost_usd
    );
    println!();
    println!("escalating the examples below each confidence threshold:");
    println!(
        "{:>9}  {:>9}  {:>11}  {:>8}  {:>10}  {:>7}",
        "threshold", "escalated", "local share", "accuracy", "cost USD", "saving"
    );
    for row in &report.by_threshold {
        let saving = row.saving.map_or("-".to_string(), |s| format!("{:.1}%", s * 100.0));
        println!(
            "{:>9.4}  {:>9}  {:>11.3}  {:>8.4}  {:>10.4}  {:>7}",
            row.threshold, row.escalated, row.local_share, row.accuracy, row.cost_usd, saving
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(local_correct: bool, local_confidence: f64, remote: Option<(bool, f64)>) -> ExampleOutcome {
        ExampleOutcome {
            local_correct,
            local_confidence,
            remote: remote.map(|(correct, cost_usd)| RemoteAnswer { correct, cost_usd }),
        }
    }

    fn outcomes() -> Vec<ExampleOutcome> {
        vec![
            outcome(true, 0.95, Some((true, 0.01))),
            outcome(false, 0.55, Some((true, 0.02))),
            outcome(true, 0.7, Some((false, 0.03))),
            // Kept local for personal data: never escalates.
            outcome(false, 0.51, None),
        ]
    }

    #[test]
    fn threshold_zero_keeps_everything_local() {
        let row = row(&outcomes(), 0.0, 0.06);
        assert_eq!(row.escalated, 0);
        assert_eq!(row.local_share, 1.0);
        assert_eq!(row.accuracy, 0.5);
        assert_eq!(row.cost_usd, 0.0);
        assert_eq!(row.saving, Some(1.0));
    }

    #[test]
    fn examples_below_threshold_escalate() {
        let row = row(&outcomes(), 0.8, 0.06);
        assert_eq!(row.escalated, 2);
        assert_eq!(row.local_share, 0.5);
        // Local right at 0.95, remote right at 0.55, remote wrong at 0.7, local wrong at 0.51.
        assert_eq!(row.accuracy, 0.5);
        assert!((row.cost_usd - 0.05).abs() < 1e-12, "{}", row.cost_usd);
        let saving = row.saving.expect("saving");
        assert!((saving - (1.0 - 0.05 / 0.06)).abs() < 1e-12, "{saving}");
    }

    #[test]
    fn frontier_only_sends_every_sendable_example() {
        let frontier = frontier_only(&outcomes());
        assert_eq!(frontier.escalated, 3);
        assert_eq!(frontier.accuracy, 0.5);
        assert!((frontier.cost_usd - 0.06).abs() < 1e-12);
        assert_eq!(frontier.saving, Some(0.0));
    }

    #[test]
    fn free_frontier_has_no_saving() {
        let outcomes = [outcome(true, 0.2, Some((true, 0.0)))];
        assert_eq!(row(&outcomes, 0.5, 0.0).saving, None);
    }
}
