//! A loaded classification task: its labels and backend chain, and the classification of a
//! batch of inputs through that chain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use unicode_normalization::UnicodeNormalization;

use super::backend::{Backend, BackendError, BackendOutput, HeadRunner, LlmRunner, PrepareError, PreparedInput, Runner};
use super::dataset;
use super::encoder_worker::EncoderWorker;
use super::fit::fit_head;
use super::head::Head;
use super::label_scoring::{LabelSet, LabelSetError};
use super::prompt::{interleave_examples, PromptLabel, PromptTask, PromptTemplate};
use super::task_config::{BackendConfig, LabelConfig, Overflow, PromptFormat, TaskConfig};
use super::train::TrainOptions;
use crate::config::EncoderConfig;
use crate::registry::Registry;
use crate::routing::config::EscalationConfig;

/// A label as `/v1/tasks` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LabelInfo {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

pub struct Task {
    pub name: String,
    pub description: Option<String>,
    pub labels: Vec<LabelInfo>,
    pub threshold: f64,
    pub max_input_tokens: usize,
    pub on_overflow: Overflow,
    pub backends: Vec<Backend>,
    /// Remote models asked for the label of a result below the threshold.
    pub escalate: Option<EscalationConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskLoadError {
    #[error("task `{task}`: {message}")]
    Invalid { task: String, message: String },
    #[error("task `{task}`, backend {index}: {message}")]
    Backend {
        task: String,
        index: usize,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("`input` must contain at least one text")]
    NoInput,
    #[error("input {index} is empty or whitespace only")]
    EmptyInput { index: usize },
    #[error("input {index} contains nothing the {backend} backend can read (only invisible, control or combining characters)")]
    NoTokens { index: usize, backend: &'static str },
    #[error("input {index} has {tokens} tokens, more than task `{task}` accepts ({limit}); shorten it or configure the task with on_overflow = \"truncate\"")]
    TooLong {
        index: usize,
        task: String,
        tokens: usize,
        limit: usize,
    },
    #[error("input {index} could not be prepared for the {backend} backend: {message}")]
    Prepare {
        index: usize,
        backend: &'static str,
        message: String,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Internal(String),
}

/// One backend's result for one input, listed so a client sees the whole chain.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub backend: &'static str,
    pub model: String,
    pub label: String,
    pub confidence: f64,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassifyResult {
    pub index: usize,
    pub label: String,
    pub confidence: f64,
    /// Probability of every label.
    pub scores: HashMap<String, f64>,
    /// Backend and model that produced this result.
    pub backend: &'static str,
    pub model: String,
    /// True when the confidence is below the task threshold.
    pub below_threshold: bool,
    /// True when the input was cut to the task's `max_input_tokens`.
    pub truncated: bool,
    /// Tokens of the input in the tokenizer of the backend that produced the result, before
    /// truncation.
    pub input_tokens: usize,
    pub timings: ResultTimings,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResultTimings {
    /// Time spent in backends for this input.
    pub ms: f64,
    /// Every backend tried, in order; the last one answered.
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassifyUsage {
    /// Tokens run through encoders and models, over every backend tried.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from an earlier input.
    pub cached_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    pub results: Vec<ClassifyResult>,
    pub usage: ClassifyUsage,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Task {
    /// Classifies `inputs` in order: normalises them to NFC, checks them, then runs each
    /// through the backend chain, batching the inputs that reach the same backend.
    pub async fn classify(self: Arc<Self>, inputs: Vec<String>) -> Result<Classification, ClassifyError> {
        self.classify_with(inputs, None).await
    }

    /// Like [`Task::classify`], but with `only` set, runs that one backend on every input.
    pub async fn classify_with(
        self: Arc<Self>,
        inputs: Vec<String>,
        only: Option<usize>,
    ) -> Result<Classification, ClassifyError> {
        let started = Instant::now();
        if inputs.is_empty() {
            return Err(ClassifyError::NoInput);
        }
        let inputs: Vec<String> = inputs.iter().map(|text| text.nfc().collect()).collect();
        if let Some(index) = inputs.iter().position(|text| text.trim().is_empty()) {
            return Err(ClassifyError::EmptyInput { index });
        }
        let chain: Vec<usize> = match only {
            Some(index) => vec![index],
            None => (0..self.backends.len()).collect(),
        };
        // Tokenizing and rendering prompts for a large batch takes long enough to stall the
        // async runtime, so it runs on the blocking pool.
        let task = self.clone();
        let prepare_chain = chain.clone();
        let (inputs, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = task.prepare(&inputs, &prepare_chain);
            (inputs, prepared)
        })
        .await
        .map_err(|e| ClassifyError::Internal(format!("input preparation stopped: {e}")))?;
        let prepared = prepared?;

        let mut attempts: Vec<Vec<(usize, BackendOutput)>> = vec![Vec::new(); inputs.len()];
        let mut pending: Vec<usize> = (0..inputs.len()).collect();
        for (position, &backend_index) in chain.iter().enumerate() {
            if pending.is_empty() {
                break;
            }
            let backend = &self.backends[backend_index];
            let batch: Vec<PreparedInput> = pending.iter().map(|&i| prepared[position][i].clone()).collect();
            let outputs = backend.run(batch).await?;
            let last = position + 1 == chain.len();
            let mut still_pending = Vec::new();
            for (&input, output) in pending.iter().zip(outputs) {
                let confidence = output.probabilities.iter().copied().fold(0.0, f64::max);
                let accepted = last || backend.accept.is_none_or(|accept| confidence >= accept);
                attempts[input].push((position, output));
                if !accepted {
                    still_pending.push(input);
                }
            }
            pending = still_pending;
        }

        let mut usage = ClassifyUsage::default();
        let mut results = Vec::with_capacity(inputs.len());
        for (index, tried) in attempts.into_iter().enumerate() {
            results.push(self.result(index, &chain, &prepared, tried, &mut usage));
        }
        usage.total_tokens = usage.prompt_tokens;
        Ok(Classification {
            results,
            usage,
            elapsed: started.elapsed(),
        })
    }

    /// Tokenizes every input for every backend of `chain` up front, so a bad input fails the
    /// request before any backend runs.
    fn prepare(&self, inputs: &[String], chain: &[usize]) -> Result<Vec<Vec<PreparedInput>>, ClassifyError> {
        let mut prepared = Vec::with_capacity(chain.len());
        for &backend_index in chain {
            let backend = &self.backends[backend_index];
            let mut per_input = Vec::with_capacity(inputs.len());
            for (index, text) in inputs.iter().enumerate() {
                match backend.prepare(text, self.max_input_tokens, self.on_overflow) {
                    Ok(input) => per_input.push(input),
                    Err(PrepareError::TooLong { tokens, limit }) => {
                        return Err(ClassifyError::TooLong {
                            index,
                            task: self.name.clone(),
                            tokens,
                            limit,
                        })
                    }
                    Err(PrepareError::NoTokens) => {
                        return Err(ClassifyError::NoTokens {
                            index,
                            backend: backend.kind,
                        })
                    }
                    Err(PrepareError::Failed(message)) => {
                        return Err(ClassifyError::Prepare {
                            index,
                            backend: backend.kind,
                            message,
                        })
                    }
                }
            }
            prepared.push(per_input);
        }
        Ok(prepared)
    }

    fn result(
        &self,
        index: usize,
        chain: &[usize],
        prepared: &[Vec<PreparedInput>],
        tried: Vec<(usize, BackendOutput)>,
        usage: &mut ClassifyUsage,
    ) -> ClassifyResult {
        let mut attempts = Vec::with_capacity(tried.len());
        let mut total = Duration::ZERO;
        for (position, output) in &tried {
            let backend = &self.backends[chain[*position]];
            let (label, confidence) = self.best(&output.probabilities);
            usage.prompt_tokens += output.prompt_tokens;
            usage.cached_tokens += output.cached_tokens;
            total += output.elapsed;
            attempts.push(Attempt {
                backend: backend.kind,
                model: backend.model.clone(),
                label: self.labels[label].name.clone(),
                confidence,
                ms: output.elapsed.as_secs_f64() * 1000.0,
            });
        }
        // Every input reaches at least the first backend, so `tried` is never empty.
        let (position, output) = &tried[tried.len() - 1];
        let backend = &self.backends[chain[*position]];
        let input = &prepared[*position][index];
        let (label, confidence) = self.best(&output.probabilities);
        let scores = self
            .labels
            .iter()
            .zip(&output.probabilities)
            .map(|(label, &p)| (label.name.clone(), p))
            .collect();
        ClassifyResult {
            index,
            label: self.labels[label].name.clone(),
            confidence,
            scores,
            backend: backend.kind,
            model: backend.model.clone(),
            below_threshold: confidence < self.threshold,
            truncated: input.truncated,
            input_tokens: input.input_tokens,
            timings: ResultTimings {
                ms: total.as_secs_f64() * 1000.0,
                attempts,
            },
        }
    }

    /// Returns the most probable label (the first on ties) and its probability.
    fn best(&self, probabilities: &[f64]) -> (usize, f64) {
        let mut best = (0, f64::NEG_INFINITY);
        for (index, &p) in probabilities.iter().enumerate() {
            if p > best.1 {
                best = (index, p);
            }
        }
        best
    }
}

/// Encoders by id and served language models, from which a task's backends are built.
pub struct TaskResources<'a> {
    pub encoders: &'a HashMap<String, Arc<EncoderWorker>>,
    pub registry: &'a Registry,
}

impl Task {
    /// Loads `config`, training and writing missing head files. Blocking.
    pub fn load(config: &TaskConfig, resources: &TaskResources<'_>) -> Result<Self, TaskLoadError> {
        let task = config.name.clone();
        let invalid = |message: String| TaskLoadError::Invalid {
            task: task.clone(),
            message,
        };
        config.validate().map_err(invalid)?;

        let labels = match config.labels.is_empty() {
            false => config.labels.clone(),
            true => labels_from_head(config).map_err(invalid)?,
        };
        let names: Vec<String> = labels.iter().map(|l| l.name.clone()).collect();

        let mut backends = Vec::with_capacity(config.backends.len());
        for (index, backend) in config.backends.iter().enumerate() {
            let loaded = load_backend(config, &labels, &names, backend, resources).map_err(|message| {
                TaskLoadError::Backend {
                    task: task.clone(),
                    index,
                    message,
                }
            })?;
            backends.push(loaded);
        }

        Ok(Self {
            name: config.name.clone(),
            description: config.description.clone(),
            labels: labels
                .into_iter()
                .map(|l| LabelInfo {
                    name: l.name,
                    description: l.description,
                })
                .collect(),
            threshold: config.threshold,
            max_input_tokens: config.max_input_tokens,
            on_overflow: config.on_overflow,
            backends,
            escalate: config.escalate.clone(),
        })
    }
}

/// Reads the label names of the task's first head file.
fn labels_from_head(config: &TaskConfig) -> Result<Vec<LabelConfig>, String> {
    let head = config.backends.iter().find_map(|backend| match backend {
        BackendConfig::EmbeddingHead { head: Some(path), .. } => Some(path),
        _ => None,
    });
    let Some(path) = head else {
        return Err("lists no labels and has no head file to take them from".into());
    };
    let head = Head::load(path).map_err(|e| e.to_string())?;
    Ok(head
        .labels
        .into_iter()
        .map(|name| LabelConfig {
            name,
            description: None,
            examples: Vec::new(),
            text: None,
        })
        .collect())
}

fn load_backend(
    config: &TaskConfig,
    labels: &[LabelConfig],
    names: &[String],
    backend: &BackendConfig,
    resources: &TaskResources<'_>,
) -> Result<Backend, String> {
    let runner = match backend {
        BackendConfig::EmbeddingHead {
            encoder,
            head,
            train_data,
            temperature,
            l2,
            ..
        } => {
            let worker = resources
                .encoders
                .get(encoder)
                .ok_or_else(|| format!("encoder `{encoder}` is not loaded"))?
                .clone();
            let head = load_or_fit_head(config, labels, names, encoder, &worker, head.as_deref(), train_data, *l2)?;
            if head.model.dim != worker.encoder.dim {
                return Err(format!(
                    "the head expects {}-dimensional embeddings, encoder `{encoder}` produces {}",
                    head.model.dim, worker.encoder.dim
                ));
            }
            let to_task = map_head_labels(&head.labels, names)?;
            Runner::Head(HeadRunner {
                encoder: worker,
                head,
                to_task,
                temperature: *temperature,
            })
        }
        BackendConfig::LlmLabels {
            model,
            format,
            prompt,
            system,
            label_prefix,
            shots,
            temperature,
            ..
        } => {
            let served = resources
                .registry
                .get(model)
                .ok_or_else(|| format!("model `{model}` is not served"))?;
            let prompt_labels: Vec<PromptLabel> = labels
                .iter()
                .map(|l| PromptLabel {
                    name: l.name.clone(),
                    text: l.llm_text(),
                    description: l.description.clone(),
                })
                .collect();
            let per_label: Vec<(String, Vec<String>)> = labels.iter().map(|l| (l.llm_text(), l.examples.clone())).collect();
            let examples = interleave_examples(&per_label, *shots);
            let task = PromptTask {
                name: config.name.clone(),
                description: config.description.clone().unwrap_or_default(),
            };
            let template = PromptTemplate::new(prompt.as_deref(), *format, task, prompt_labels, examples)
                .map_err(|e| format!("invalid prompt template: {e}"))?;

            let prefix = label_prefix.clone().unwrap_or_else(|| match format {
                PromptFormat::Chat => String::new(),
                PromptFormat::Plain => " ".into(),
            });
            let mut sequences = Vec::with_capacity(labels.len());
            for label in labels {
                let tokens = served.encode(&format!("{prefix}{}", label.llm_text()), false)?;
                sequences.push(tokens);
            }
            let end_token = match format {
                PromptFormat::Chat => served.model.special.eos,
                PromptFormat::Plain => None,
            };
            let end_token = match end_token {
                Some(token) => token,
                None => *served
                    .encode("\n", false)?
                    .first()
                    .ok_or_else(|| format!("model `{model}` encodes a newline as no tokens"))?,
            };
            let label_set = LabelSet::new(sequences, end_token).map_err(|e| match e {
                LabelSetError::Duplicate { first, second } => format!(
                    "labels `{}` and `{}` have the same tokens for model `{model}`; set a distinct `text`",
                    names[first], names[second]
                ),
                LabelSetError::Empty { index } => format!(
                    "label `{}` has no tokens for model `{model}`; set a non-empty `text`",
                    names[index]
                ),
            })?;
            Runner::Llm(Box::new(LlmRunner {
                model: served,
                template,
                format: *format,
                system: system.clone(),
                labels: Arc::new(label_set),
                temperature: *temperature,
            }))
        }
    };
    Ok(Backend {
        kind: backend.kind(),
        model: backend.model().to_string(),
        accept: backend.accept(),
        runner,
    })
}

/// L2 penalty of a head fitted from a few examples per label. Each class then carries a large
/// share of the data, and the trainer's default (tuned for thousands of samples) lets the
/// weights grow until every example gets a probability near 1.
const EXAMPLE_HEAD_L2: f64 = 1e-2;

#[allow(clippy::too_many_arguments)]
fn load_or_fit_head(
    config: &TaskConfig,
    labels: &[LabelConfig],
    names: &[String],
    encoder_id: &str,
    worker: &EncoderWorker,
    path: Option<&std::path::Path>,
    train_data: &[std::path::PathBuf],
    l2: Option<f64>,
) -> Result<Head, String> {
    if let Some(path) = path.filter(|p| p.is_file()) {
        return Head::load(path).map_err(|e| e.to_string());
    }
    let examples: Vec<dataset::Example> = if train_data.is_empty() {
        labels
            .iter()
            .flat_map(|label| {
                label.examples.iter().map(|text| dataset::Example {
                    text: text.clone(),
                    label: label.name.clone(),
                    origin: None,
                })
            })
            .collect()
    } else {
        dataset::read_all(train_data).map_err(|e| e.to_string())?
    };
    if examples.is_empty() {
        return Err(match path {
            Some(path) => format!(
                "head file {} is missing, and there is no `train_data` and no label examples to train one",
                path.display()
            ),
            None => "no `head` file, no `train_data` and no label examples to train a head on".into(),
        });
    }

    let mut options = TrainOptions::default();
    if train_data.is_empty() {
        options.l2 = EXAMPLE_HEAD_L2;
    }
    if let Some(l2) = l2 {
        options.l2 = l2;
    }
    let started = Instant::now();
    let (head, report) = fit_head(&worker.encoder, encoder_id, names, &examples, config.max_input_tokens, &options)
        .map_err(|e| e.to_string())?;
    tracing::info!(
        task = %config.name,
        examples = examples.len(),
        iterations = report.iterations,
        converged = report.converged,
        ms = started.elapsed().as_millis() as u64,
        "trained a head at start"
    );
    if let Some(path) = path {
        head.save(path, &[("trained_by", "tierd serve".to_string())])
            .map_err(|e| e.to_string())?;
        tracing::info!(task = %config.name, path = %path.display(), "head written");
    }
    Ok(head)
}

/// Maps each head class to the task label of the same name; both must hold the same names.
fn map_head_labels(head_labels: &[String], names: &[String]) -> Result<Vec<usize>, String> {
    if head_labels.len() != names.len() {
        return Err(format!(
            "the head has {} labels and the task {}",
            head_labels.len(),
            names.len()
        ));
    }
    head_labels
        .iter()
        .map(|label| {
            names
                .iter()
                .position(|name| name == label)
                .ok_or_else(|| format!("the head's label `{label}` is not one of the task's labels"))
        })
        .collect()
}

/// Every loaded task, in configuration order.
#[derive(Default)]
pub struct TaskSet {
    tasks: Vec<Arc<Task>>,
    /// The encoders the tasks use, with the config each was loaded from, so that a reload
    /// keeps those whose config is unchanged.
    encoders: Vec<(EncoderConfig, Arc<EncoderWorker>)>,
}

impl TaskSet {
    pub fn new(tasks: Vec<Task>, encoders: Vec<(EncoderConfig, Arc<EncoderWorker>)>) -> Self {
        Self {
            tasks: tasks.into_iter().map(Arc::new).collect(),
            encoders,
        }
    }

    /// Returns the loaded encoder `id` if it was loaded from `config`.
    pub fn encoder_loaded_from(&self, id: &str, config: &EncoderConfig) -> Option<Arc<EncoderWorker>> {
        self.encoders
            .iter()
            .find(|(loaded, _)| loaded.id == id && format!("{loaded:?}") == format!("{config:?}"))
            .map(|(_, worker)| worker.clone())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Task>> {
        self.tasks.iter().find(|task| task.name == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Task>> {
        self.tasks.iter()
    }
}
