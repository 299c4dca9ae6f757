//! Runs a task over labelled examples and collects its predictions, for `tierd eval` and
//! `tierd calibrate`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::classify::dataset::Example;
use crate::classify::metrics::Prediction;
use crate::classify::Task;

/// Inputs sent to the task in one call.
const BATCH: usize = 64;

/// Predictions, token counts and time of a run of a task over labelled examples.
pub struct LabelledRun {
    /// One prediction per example, in input order.
    pub predictions: Vec<Prediction>,
    /// Inputs answered by each backend of the chain: `(backend, model, count)`.
    pub answered_by: Vec<(String, String, usize)>,
    pub seconds: f64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

/// Returns the index of each example's label among the task's labels, or an error naming the
/// first example whose label the task does not have.
pub fn truths(task: &Task, examples: &[Example]) -> anyhow::Result<Vec<usize>> {
    let names: Vec<&str> = task.labels.iter().map(|l| l.name.as_str()).collect();
    examples
        .iter()
        .enumerate()
        .map(|(index, example)| {
            names.iter().position(|n| *n == example.label).with_context(|| {
                format!(
                    "{}: label `{}` is not one of task `{}`'s labels ({})",
                    example.describe(index),
                    example.label,
                    task.name,
                    names.join(", ")
                )
            })
        })
        .collect()
}

/// Classifies every example with the task's chain, or with only backend `backend` when given,
/// and reports progress on stderr.
pub fn run(
    task: &Arc<Task>,
    examples: &[Example],
    backend: Option<usize>,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<LabelledRun> {
    let truths = truths(task, examples)?;
    let names: Vec<&str> = task.labels.iter().map(|l| l.name.as_str()).collect();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut run = LabelledRun {
        predictions: Vec::with_capacity(examples.len()),
        answered_by: Vec::new(),
        seconds: 0.0,
        prompt_tokens: 0,
        cached_tokens: 0,
    };
    for (batch_index, batch) in examples.chunks(BATCH).enumerate() {
        let texts: Vec<String> = batch.iter().map(|e| e.text.clone()).collect();
        let classification = runtime.block_on(task.clone().classify_with(texts, backend))?;
        run.prompt_tokens += classification.usage.prompt_tokens;
        run.cached_tokens += classification.usage.cached_tokens;
        for result in classification.results {
            let predicted = names.iter().position(|n| *n == result.label).unwrap_or(0);
            run.predictions.push(Prediction {
                predicted,
                truth: truths[run.predictions.len()],
                confidence: result.confidence,
            });
            match run
                .answered_by
                .iter_mut()
                .find(|(kind, model, _)| kind == result.backend && *model == result.model)
            {
                Some(entry) => entry.2 += 1,
                None => run.answered_by.push((result.backend.to_string(), result.model.clone(), 1)),
            }
        }
        let progress = format!(
            "{} / {} examples, {:.1} s",
            batch_index * BATCH + batch.len(),
            examples.len(),
            started.elapsed().as_secs_f64()
        );
        // A terminal shows one line that updates in place; a log file gets one line a batch.
        if terminal {
            eprint!("\r{progress}");
        } else {
            eprintln!("{progress}");
        }
    }
    if terminal {
        eprintln!();
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}
