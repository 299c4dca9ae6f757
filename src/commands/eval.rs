//! `tierd eval`: runs a task on labelled JSONL data and reports accuracy, macro-F1,
//! expected calibration error, and accuracy against coverage per confidence threshold. With
//! `--escalate-to`, it also reports accuracy and cost of escalating to a remote model.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::classify::dataset;
use crate::classify::metrics::{
    accuracy, coverage_table, expected_calibration_error, macro_f1, most_confident, CoverageRow,
};
use crate::config::Config;

use super::escalation_eval::{self, EscalationReport, EscalationTarget};
use super::labelled_run::{self, LabelledRun};

pub struct EvalArgs {
    pub task: String,
    pub data: Vec<PathBuf>,
    /// Run only this backend (index in the task's chain) instead of the whole chain.
    pub backend: Option<usize>,
    /// Evaluate only the first this many examples.
    pub limit: Option<usize>,
    pub json: bool,
    /// Remote model (`provider/model`) asked for the label of every example.
    pub escalate_to: Option<String>,
    /// Confidence thresholds of the tables; `DEFAULT_THRESHOLDS` when not set.
    pub thresholds: Option<Vec<f64>>,
}

/// Thresholds of the tables when `--thresholds` is not given.
pub const DEFAULT_THRESHOLDS: [f64; 10] = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99];

/// Equal-width confidence bins of the calibration error.
const ECE_BINS: usize = 10;
/// Shares of inputs, most confident first, whose accuracy the report lists.
const COVERAGES: [f64; 4] = [0.5, 0.7, 0.9, 1.0];

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub task: String,
    pub data: Vec<String>,
    /// `chain`, or the single backend that was run.
    pub backends: String,
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub expected_calibration_error: f64,
    pub ece_bins: usize,
    /// Inputs answered by each backend of the chain: `(backend, model, count)`.
    pub answered_by: Vec<(String, String, usize)>,
    pub by_threshold: Vec<CoverageRow>,
    pub by_coverage: Vec<CoverageRow>,
    pub seconds: f64,
    pub inputs_per_second: f64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationReport>,
}

pub fn run(config: &Config, args: &EvalArgs) -> anyhow::Result<()> {
    let thresholds = args.thresholds.clone().unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec());
    if let Some(bad) = thresholds.iter().find(|t| !(0.0..=1.0).contains(*t)) {
        bail!("--thresholds: {bad} is not a confidence from 0 to 1");
    }
    let task_config = super::task_config(config, &args.task)?;
    let target = args
        .escalate_to
        .as_deref()
        .map(|target| EscalationTarget::new(config, target))
        .transpose()?;
    super::check_backend_index(&task_config, args.backend)?;
    let task = super::load_task(config, task_config)?;

    let mut examples = dataset::read_all(&args.data)?;
    if let Some(limit) = args.limit {
        examples.truncate(limit);
    }
    let names: Vec<&str> = task.labels.iter().map(|l| l.name.as_str()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let LabelledRun {
        predictions,
        answered_by,
        seconds,
        prompt_tokens,
        cached_tokens,
    } = labelled_run::run(&task, &examples, args.backend, &runtime)?;

    let escalation = match &target {
        Some(target) => Some(escalation_eval::evaluate(
            target,
            &task,
            &examples,
            &predictions,
            &thresholds,
            &runtime,
        )?),
        None => None,
    };
    let report = EvalReport {
        task: task.name.clone(),
        data: args.data.iter().map(|p| p.display().to_string()).collect(),
        backends: match args.backend {
            Some(index) => format!("{index} ({})", task.backends[index].kind),
            None => "chain".into(),
        },
        examples: predictions.len(),
        accuracy: accuracy(&predictions),
        macro_f1: macro_f1(&predictions, names.len()),
        expected_calibration_error: expected_calibration_error(&predictions, ECE_BINS),
        ece_bins: ECE_BINS,
        answered_by,
        by_threshold: coverage_table(&predictions, &thresholds),
        by_coverage: COVERAGES.iter().map(|&c| most_confident(&predictions, c)).collect(),
        seconds,
        inputs_per_second: predictions.len() as f64 / seconds.max(1e-9),
        prompt_tokens,
        cached_tokens,
        escalation,
    };

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(report: &EvalReport) {
    println!("task {}  backends {}  data {}", report.task, report.backends, report.data.join(", "));
    println!(
        "examples {}  accuracy {:.4}  macro-F1 {:.4}  ECE ({} bins) {:.4}",
        report.examples, report.accuracy, report.macro_f1, report.ece_bins, report.expected_calibration_error
    );
    for (backend, model, count) in &report.answered_by {
        println!("answered by {backend} ({model}): {count}");
    }
    println!(
        "{:.1} s, {:.1} inputs/s, {} prompt tokens ({} reused from the prefix cache)",
        report.seconds, report.inputs_per_second, report.prompt_tokens, report.cached_tokens
    );
    println!();
    print_rows("answers kept at each confidence threshold:", &report.by_threshold);
    println!();
    print_rows("the most confident share of answers:", &report.by_coverage);
    if let Some(escalation) = &report.escalation {
        println!();
        escalation_eval::print_report(escalation);
    }
}

fn print_rows(title: &str, rows: &[CoverageRow]) {
    println!("{title}");
    println!(
        "{:>9}  {:>8}  {:>8}  {:>8}  {:>17}",
        "threshold", "answered", "coverage", "accuracy", "95% interval"
    );
    for row in rows {
        let accuracy = row.accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
        let interval = row
            .interval
            .map_or("-".to_string(), |(low, high)| format!("{low:.3} to {high:.3}"));
        println!(
            "{:>9.4}  {:>8}  {:>8.3}  {:>8}  {:>17}",
            row.threshold, row.answered, row.coverage, accuracy, interval
        );
    }
}
