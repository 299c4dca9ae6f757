//! `tierd train`: fits a task's embedding head on labelled JSONL data and writes it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::classify::dataset;
use crate::classify::encoder::SentenceEncoder;
use crate::classify::fit::fit_head;
use crate::classify::task_config::BackendConfig;
use crate::classify::train::TrainOptions;
use crate::config::Config;

pub struct TrainArgs {
    pub task: String,
    pub data: Vec<PathBuf>,
    /// Output file; the backend's `head` path by default.
    pub out: Option<PathBuf>,
    pub l2: Option<f64>,
    pub balance_classes: bool,
}

pub fn run(config: &Config, args: &TrainArgs) -> anyhow::Result<()> {
    let task = super::task_config(config, &args.task)?;
    let Some((encoder_id, head_path, l2)) = task.backends.iter().find_map(|backend| match backend {
        BackendConfig::EmbeddingHead { encoder, head, l2, .. } => Some((encoder.clone(), head.clone(), *l2)),
        BackendConfig::LlmLabels { .. } => None,
    }) else {
        bail!("task `{}` has no embedding_head backend to train", task.name);
    };
    let out = match (&args.out, head_path) {
        (Some(out), _) => out.clone(),
        (None, Some(path)) => path,
        (None, None) => bail!("task `{}` sets no `head` file; pass --out FILE", task.name),
    };

    let examples = dataset::read_all(&args.data)?;
    let labels: Vec<String> = if task.labels.is_empty() {
        // A task whose labels come from its head keeps them in the head's order.
        let mut seen: Vec<String> = Vec::new();
        for example in &examples {
            if !seen.contains(&example.label) {
                seen.push(example.label.clone());
            }
        }
        seen
    } else {
        task.labels.iter().map(|l| l.name.clone()).collect()
    };

    let encoders = config.resolved_encoders()?;
    let encoder_config = encoders
        .iter()
        .find(|e| e.id == encoder_id)
        .with_context(|| format!("encoder `{encoder_id}` is not configured"))?;
    let encoder = SentenceEncoder::load(&encoder_config.path)
        .with_context(|| format!("failed to load encoder `{encoder_id}`"))?;

    let mut options = TrainOptions {
        balance_classes: args.balance_classes,
        ..TrainOptions::default()
    };
    if let Some(l2) = args.l2.or(l2) {
        options.l2 = l2;
    }
    let started = Instant::now();
    let (head, report) = fit_head(&encoder, &encoder_id, &labels, &examples, task.max_input_tokens, &options)?;
    let data: Vec<String> = args.data.iter().map(|p| p.display().to_string()).collect();
    head.save(
        &out,
        &[
            ("trained_by", "tierd train".to_string()),
            ("train_data", data.join(", ")),
            ("l2", options.l2.to_string()),
        ],
    )?;
    println!(
        "trained task `{}` on {} examples ({} labels): {} iterations, loss {:.5}, converged: {}, {:.1} s",
        task.name,
        examples.len(),
        labels.len(),
        report.iterations,
        report.loss,
        report.converged,
        started.elapsed().as_secs_f64()
    );
    println!("wrote {}", out.display());
    Ok(())
}
