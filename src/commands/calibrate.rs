//! `tierd calibrate`: runs a task on labelled JSONL data and picks the threshold that keeps the
//! most answers local while their accuracy still reaches a target, judged by the lower bound
//! of its 95 % Wilson interval so that a small sample cannot pass on luck. Optionally checks
//! the choice on a held-out share of the data, draws the curves as a PNG and applies the
//! threshold through a running server's admin API.

use std::path::PathBuf;

use anyhow::{bail, Context};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::chart::calibration::{self as chart, CalibrationChart};
use crate::classify::calibration::{best_lower_bound, choose, configured_threshold, curve, CurvePoint};
use crate::classify::dataset::{self, Example};
use crate::classify::metrics::{coverage_table, CoverageRow, Prediction};
use crate::config::Config;

use super::labelled_run;
use super::policy::{self, AdminTarget, PolicyCommand, PolicyEdit};

pub struct CalibrateArgs {
    pub task: String,
    pub data: Vec<PathBuf>,
    /// Accuracy the kept answers must reach, from 0 to 1.
    pub target_accuracy: f64,
    /// Share of the examples set aside to check the chosen threshold on, from 0 to below 1.
    pub holdout: f64,
    /// Seed of the shuffle that splits off the held-out share.
    pub seed: u64,
    /// Run only this backend (index in the task's chain) instead of the whole chain.
    pub backend: Option<usize>,
    /// Use only the first this many examples.
    pub limit: Option<usize>,
    /// PNG file of the chart.
    pub chart: PathBuf,
    pub json: bool,
    /// Server whose threshold for the task is set to the chosen one.
    pub apply: Option<AdminTarget>,
}

/// Thresholds the printed table lists, besides the chosen and the configured one.
const TABLE_THRESHOLDS: [f64; 10] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99];

#[derive(Debug, Serialize)]
pub struct CalibrationReport {
    pub task: String,
    pub data: Vec<String>,
    /// `chain`, or the single backend that was run.
    pub backends: String,
    pub target_accuracy: f64,
    /// Examples the threshold was chosen on.
    pub calibration_examples: usize,
    pub held_out_examples: usize,
    /// The threshold in the task's config now.
    pub configured_threshold: f64,
    /// Threshold to configure, `None` when none reaches the target.
    pub threshold: Option<f64>,
    /// The answers kept at `threshold`, or at the threshold with the highest lower bound when
    /// none reaches the target.
    pub calibration: Option<CurvePoint>,
    /// The answers of the held-out data kept at `threshold`.
    pub held_out: Option<CoverageRow>,
    /// Whether the kept held-out answers reach the target accuracy.
    pub held_out_meets_target: Option<bool>,
    pub chart: String,
    /// Whether the server took the threshold.
    pub applied: bool,
    pub seconds: f64,
    /// Rows at the thresholds of the printed table, on the calibration data.
    pub table: Vec<CoverageRow>,
    /// The same rows on the held-out data.
    pub held_out_table: Vec<CoverageRow>,
    /// One point per distinct confidence of the calibration data, highest first.
    pub curve: Vec<CurvePoint>,
}

pub fn run(config: &Config, args: &CalibrateArgs) -> anyhow::Result<()> {
    if !(args.target_accuracy > 0.0 && args.target_accuracy < 1.0) {
        bail!(
            "--target-accuracy {} must lie between 0 and 1 (exclusive): no finite data proves an accuracy of 1",
            args.target_accuracy
        );
    }
    if !(0.0..1.0).contains(&args.holdout) {
        bail!("--holdout {} must be a share from 0 to below 1", args.holdout);
    }
    if args.limit == Some(0) {
        bail!("--limit 0 leaves no examples; give at least 1");
    }
    if args.apply.is_some() && args.backend.is_some() {
        bail!(
            "--apply sets the threshold that the whole chain's answers are compared with, so it cannot be \
             chosen from --backend {} alone; drop one of the two",
            args.backend.unwrap_or_default()
        );
    }
    if let Some(folder) = args.chart.parent().filter(|f| !f.as_os_str().is_empty() && !f.is_dir()) {
        bail!("--chart {}: the folder {} does not exist", args.chart.display(), folder.display());
    }
    if let Some(target) = &args.apply {
        policy::admin_token(target)?;
    }
    let task_config = super::task_config(config, &args.task)?;
    let configured = task_config.threshold;
    super::check_backend_index(&task_config, args.backend)?;

    let mut examples = dataset::read_all(&args.data)?;
    if let Some(limit) = args.limit {
        examples.truncate(limit);
    }
    let (calibration_examples, held_out_examples) = split(examples, args.holdout, args.seed);
    if calibration_examples.is_empty() {
        bail!("--holdout {} leaves no examples to calibrate on", args.holdout);
    }
    let task = super::load_task(config, task_config)?;
    // Check every label before spending minutes on the model.
    labelled_run::truths(&task, &calibration_examples)?;
    labelled_run::truths(&task, &held_out_examples)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let calibration_run = labelled_run::run(&task, &calibration_examples, args.backend, &runtime)?;
    let held_out_run = if held_out_examples.is_empty() {
        None
    } else {
        Some(labelled_run::run(&task, &held_out_examples, args.backend, &runtime)?)
    };
    let seconds = calibration_run.seconds + held_out_run.as_ref().map_or(0.0, |run| run.seconds);
    let held_out_predictions: &[Prediction] = held_out_run.as_ref().map_or(&[], |run| &run.predictions);

    let points = curve(&calibration_run.predictions);
    let chosen = choose(&points, args.target_accuracy);
    let threshold = chosen.as_ref().map(|point| configured_threshold(&points, point));
    let held_out = match threshold {
        Some(threshold) if !held_out_predictions.is_empty() => {
            coverage_table(held_out_predictions, &[threshold]).pop()
        }
        _ => None,
    };
    let held_out_meets_target = held_out
        .as_ref()
        .map(|row| row.accuracy.is_some_and(|accuracy| accuracy >= args.target_accuracy));

    let mut table_thresholds: Vec<f64> = TABLE_THRESHOLDS
        .iter()
        .copied()
        .filter(|&t| t >= 1.0 / task.labels.len() as f64)
        .chain([configured])
        .chain(threshold)
        .collect();
    table_thresholds.sort_by(f64::total_cmp);
    table_thresholds.dedup();
    let held_out_curve = (!held_out_predictions.is_empty()).then(|| curve(held_out_predictions));
    let chart_title = format!(
        "Task {}: {} calibration examples{}",
        task.name,
        calibration_examples.len(),
        if held_out_examples.is_empty() {
            String::new()
        } else {
            format!(", {} held out", held_out_examples.len())
        }
    );
    chart::draw(
        &CalibrationChart {
            title: chart_title,
            curve: &points,
            held_out: held_out_curve.as_deref(),
            target: args.target_accuracy,
            chosen: threshold,
        },
        &args.chart,
    )?;

    let mut report = CalibrationReport {
        task: task.name.clone(),
        data: args.data.iter().map(|p| p.display().to_string()).collect(),
        backends: match args.backend {
            Some(index) => format!("{index} ({})", task.backends[index].kind),
            None => "chain".into(),
        },
        target_accuracy: args.target_accuracy,
        calibration_examples: calibration_examples.len(),
        held_out_examples: held_out_examples.len(),
        configured_threshold: configured,
        threshold,
        calibration: chosen.or_else(|| best_lower_bound(&points)),
        held_out,
        held_out_meets_target,
        chart: args.chart.display().to_string(),
        applied: false,
        seconds,
        table: coverage_table(&calibration_run.predictions, &table_thresholds),
        held_out_table: coverage_table(held_out_predictions, &table_thresholds),
        curve: points,
    };

    // A failed apply still prints the report, so the run's result is not lost.
    let mut apply_error = None;
    if let (Some(target), Some(threshold)) = (&args.apply, threshold) {
        let edit = PolicyEdit::TaskThreshold {
            task: task.name.clone(),
            threshold,
        };
        match policy::send(target, PolicyCommand::Set(edit)) {
            Ok(_) => report.applied = true,
            Err(error) => {
                apply_error = Some(error.context(format!("failed to apply threshold {threshold} through {}", target.url)))
            }
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.apply.as_ref());
    }
    if let Some(error) = apply_error {
        return Err(error);
    }
    if report.threshold.is_none() {
        bail!(
            "no threshold of task `{}` reaches accuracy {} with 95 % confidence on these {} examples",
            report.task,
            report.target_accuracy,
            report.calibration_examples
        );
    }
    Ok(())
}

/// Shuffles the examples with `seed` and sets the `holdout` share of them aside.
fn split(mut examples: Vec<Example>, holdout: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if holdout <= 0.0 {
        return (examples, Vec::new());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    let held = ((examples.len() as f64) * holdout).round() as usize;
    let held_out = examples.split_off(examples.len() - held);
    (examples, held_out)
}

fn print_report(report: &CalibrationReport, apply: Option<&AdminTarget>) {
    println!(
        "task {}  backends {}  data {}",
        report.task,
        report.backends,
        report.data.join(", ")
    );
    println!(
        "{} examples to calibrate on, {} held out to check; target accuracy {} (lower bound of the 95 % interval)",
        report.calibration_examples, report.held_out_examples, report.target_accuracy
    );
    println!();
    print_table(report);
    println!();
    print_verdict(report);
    println!("chart: {}", report.chart);
    if let (true, Some(target)) = (report.applied, apply) {
        println!(
            "applied: {} now uses threshold {} for task {}",
            target.url,
            report.threshold.unwrap_or_default(),
            report.task
        );
    }
}

/// Prints the calibration rows at the table's thresholds, with the held-out rows beside them.
fn print_table(report: &CalibrationReport) {
    let with_held_out = report.held_out_examples > 0;
    print!(
        "{:>9}  {:>6}  {:>8}  {:>8}  {:>15}",
        "threshold", "kept", "coverage", "accuracy", "95% interval"
    );
    if with_held_out {
        print!("  {:>17}  {:>17}", "held-out coverage", "held-out accuracy");
    }
    println!();
    for (index, row) in report.table.iter().enumerate() {
        print!(
            "{:>9}  {:>6}  {:>8.3}  {:>8}  {:>15}",
            row.threshold,
            row.answered,
            row.coverage,
            format_accuracy(row.accuracy),
            row.interval
                .map_or("-".to_string(), |(low, high)| format!("{low:.3} to {high:.3}"))
        );
        if let Some(held) = report.held_out_table.get(index).filter(|_| with_held_out) {
            print!("  {:>17.3}  {:>17}", held.coverage, format_accuracy(held.accuracy));
        }
        let mut marks = Vec::new();
        if Some(row.threshold) == report.threshold {
            marks.push("chosen");
        }
        if row.threshold == report.configured_threshold {
            marks.push("configured now");
        }
        if !marks.is_empty() {
            print!("  <- {}", marks.join(", "));
        }
        println!();
    }
}

/// Prints the chosen threshold, or why there is none, and how it does on the held-out data.
fn print_verdict(report: &CalibrationReport) {
    match (report.threshold, &report.calibration) {
        (Some(threshold), Some(point)) => println!(
            "threshold {threshold}: keeps {} of {} answers local ({:.1} %), accuracy {:.4} (95 % interval {:.4} to {:.4})",
            point.kept,
            report.calibration_examples,
            point.coverage * 100.0,
            point.accuracy,
            point.lower,
            point.upper
        ),
        (None, Some(best)) => println!(
            "no threshold reaches the target: the highest lower bound is {:.4}, at threshold {:.4} ({} kept, accuracy {:.4}); \
             more data narrows the interval, a better model raises the accuracy",
            best.lower, best.threshold, best.kept, best.accuracy
        ),
        (_, None) => println!("no threshold reaches the target: no answer has a confidence"),
    }
    if let (Some(row), Some(meets)) = (&report.held_out, report.held_out_meets_target) {
        println!(
            "held out: {} of {} answers kept ({:.1} %), accuracy {} (95 % interval {}): {}",
            row.answered,
            report.held_out_examples,
            row.coverage * 100.0,
            format_accuracy(row.accuracy),
            row.interval
                .map_or("-".to_string(), |(low, high)| format!("{low:.4} to {high:.4}")),
            if meets { "meets the target" } else { "below the target" }
        );
    }
}

fn format_accuracy(accuracy: Option<f64>) -> String {
    accuracy.map_or("-".to_string(), |a| format!("{a:.4}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(count: usize) -> Vec<Example> {
        (0..count)
            .map(|i| Example {
                text: format!("text {i}"),
                label: "a".into(),
                origin: None,
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_and_sets_the_share_aside() {
        let (kept, held) = split(examples(10), 0.3, 7);
        assert_eq!((kept.len(), held.len()), (7, 3));
        let (again, _) = split(examples(10), 0.3, 7);
        let texts = |list: &[Example]| list.iter().map(|e| e.text.clone()).collect::<Vec<_>>();
        assert_eq!(texts(&kept), texts(&again));
        let (unsplit, none) = split(examples(10), 0.0, 7);
        assert_eq!((texts(&unsplit), none.len()), (texts(&examples(10)), 0));
    }
}
