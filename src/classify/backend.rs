//! The two classification backends: an encoder with a linear head, and LLM label scoring.
//! Each turns an input text into label probabilities in the task's label order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::encoder::SentenceEncoder;
use super::encoder_worker::{ClassifyQueueError, EncoderWorker};
use super::head::Head;
use super::label_scoring::LabelSet;
use super::prompt::PromptTemplate;
use super::task_config::{Overflow, PromptFormat};
use crate::engine::{ChatMessage, QueueFull};
use crate::registry::ServedModel;

/// A loaded backend of one task.
pub struct Backend {
    pub kind: &'static str,
    /// Encoder or model id.
    pub model: String,
    /// Confidence at which this backend's result is kept instead of trying the next backend.
    pub accept: Option<f64>,
    pub(super) runner: Runner,
}

pub(super) enum Runner {
    Head(HeadRunner),
    // Boxed because the prompt template's environment makes this variant much larger.
    Llm(Box<LlmRunner>),
}

pub(super) struct HeadRunner {
    pub encoder: Arc<EncoderWorker>,
    pub head: Head,
    /// Task label index of each head class.
    pub to_task: Vec<usize>,
    pub temperature: f64,
}

pub(super) struct LlmRunner {
    pub model: Arc<ServedModel>,
    pub template: PromptTemplate,
    pub format: PromptFormat,
    pub system: Option<String>,
    pub labels: Arc<LabelSet>,
    pub temperature: f64,
}

/// One input in the form a backend runs it.
#[derive(Debug, Clone)]
pub struct PreparedInput {
    pub(super) tokens: Vec<u32>,
    /// Tokens of the input text itself, before any truncation.
    pub input_tokens: usize,
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("input has {tokens} tokens, more than the limit of {limit}")]
    TooLong { tokens: usize, limit: usize },
    #[error("input has no tokens")]
    NoTokens,
    #[error("{0}")]
    Failed(String),
}

/// A backend's result for one input.
#[derive(Debug, Clone)]
pub struct BackendOutput {
    /// Probability of each task label, in task label order.
    pub probabilities: Vec<f64>,
    /// Tokens run through the model for this input.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were reused from an earlier input.
    pub cached_tokens: usize,
    /// Time spent on this input; for a batched head run, the batch time divided evenly.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    QueueFull(QueueFull),
    #[error("{backend} backend on `{model}` failed: {message}")]
    Failed {
        backend: &'static str,
        model: String,
        message: String,
    },
}

impl Backend {
    /// Tokenizes `text` for this backend, enforcing the task's input limit.
    pub fn prepare(&self, text: &str, limit: usize, overflow: Overflow) -> Result<PreparedInput, PrepareError> {
        match &self.runner {
            Runner::Head(runner) => {
                let encoder = &runner.encoder.encoder;
                let mut tokens = encoder
                    .tokenize(text)
                    .map_err(|e| PrepareError::Failed(e.to_string()))?;
                // The count excludes the [CLS] and [SEP] markers.
                let input_tokens = tokens.len().saturating_sub(2);
                if input_tokens == 0 {
                    return Err(PrepareError::NoTokens);
                }
                let limit = limit.min(encoder.max_tokens - 2);
                let truncated = input_tokens > limit;
                if truncated {
                    if overflow == Overflow::Reject {
                        return Err(PrepareError::TooLong {
                            tokens: input_tokens,
                            limit,
                        });
                    }
                    SentenceEncoder::truncate(&mut tokens, limit + 2);
                }
                Ok(PreparedInput {
                    tokens,
                    input_tokens,
                    truncated,
                })
            }
            Runner::Llm(runner) => runner.prepare(text, limit, overflow),
        }
    }

    /// Runs the backend on prepared inputs; returns one output per input, in order.
    pub async fn run(&self, inputs: Vec<PreparedInput>) -> Result<Vec<BackendOutput>, BackendError> {
        let failed = |message: String| BackendError::Failed {
            backend: self.kind,
            model: self.model.clone(),
            message,
        };
        let count = inputs.len();
        let tokens: Vec<Vec<u32>> = inputs.into_iter().map(|input| input.tokens).collect();
        match &self.runner {
            Runner::Head(runner) => {
                let started = Instant::now();
                let token_counts: Vec<usize> = tokens.iter().map(Vec::len).collect();
                let embeddings = runner.encoder.embed(tokens).await.map_err(|error| match error {
                    ClassifyQueueError::Full(full) => BackendError::QueueFull(full),
                    ClassifyQueueError::Encoder(error) => failed(error.to_string()),
                })?;
                let share = started.elapsed() / count.max(1) as u32;
                Ok(embeddings
                    .iter()
                    .zip(token_counts)
                    .map(|(embedding, prompt_tokens)| BackendOutput {
                        probabilities: runner.probabilities(embedding),
                        prompt_tokens,
                        cached_tokens: 0,
                        elapsed: share,
                    })
                    .collect())
            }
            Runner::Llm(runner) => {
                let receiver = runner
                    .model
                    .worker
                    .submit_scoring(tokens, runner.labels.clone())
                    .map_err(BackendError::QueueFull)?;
                let scores = receiver
                    .await
                    .map_err(|_| failed("the model's worker thread stopped".into()))?
                    .map_err(failed)?;
                Ok(scores
                    .into_iter()
                    .map(|score| BackendOutput {
                        probabilities: softmax(&score.log_probs, runner.temperature),
                        prompt_tokens: score.prompt_tokens,
                        cached_tokens: score.cached_tokens,
                        elapsed: score.elapsed,
                    })
                    .collect())
            }
        }
    }
}

impl HeadRunner {
    fn probabilities(&self, embedding: &[f32]) -> Vec<f64> {
        let logits: Vec<f64> = self
            .head
            .model
            .logits(embedding)
            .into_iter()
            .map(f64::from)
            .collect();
        let by_class = softmax(&logits, self.temperature);
        let mut by_label = vec![0.0; by_class.len()];
        for (class, probability) in by_class.into_iter().enumerate() {
            by_label[self.to_task[class]] = probability;
        }
        by_label
    }
}

impl LlmRunner {
    fn prepare(&self, text: &str, limit: usize, overflow: Overflow) -> Result<PreparedInput, PrepareError> {
        let failed = |e: String| PrepareError::Failed(e);
        let model = &self.model;
        let input = model.encode(text, false).map_err(failed)?;
        let input_tokens = input.len();
        if input_tokens == 0 {
            return Err(PrepareError::NoTokens);
        }
        let truncated = input_tokens > limit;
        let text = if truncated {
            if overflow == Overflow::Reject {
                return Err(PrepareError::TooLong {
                    tokens: input_tokens,
                    limit,
                });
            }
            model
                .tokenizer()
                .decode(&input[..limit], false)
                .map_err(|e| failed(e.to_string()))?
        } else {
            text.to_string()
        };

        let rendered = self.template.render(&text).map_err(|e| failed(format!("prompt template: {e}")))?;
        let tokens = match self.format {
            PromptFormat::Chat => {
                let mut messages = Vec::new();
                if let Some(system) = &self.system {
                    messages.push(ChatMessage {
                        role: "system".into(),
                        content: system.clone(),
                    });
                }
                messages.push(ChatMessage {
                    role: "user".into(),
                    content: rendered,
                });
                model
                    .chat_prompt(&messages)
                    .map_err(failed)?
                    .ok_or_else(|| failed(format!("model `{}` has no chat template", model.id)))?
            }
            PromptFormat::Plain => model.encode(&rendered, true).map_err(failed)?,
        };
        let needed = tokens.len() + self.labels.max_len();
        if needed > model.context_length {
            return Err(PrepareError::Failed(format!(
                "the prompt and label need {needed} tokens, more than the {} of model `{}`",
                model.context_length, model.id
            )));
        }
        Ok(PreparedInput {
            tokens,
            input_tokens,
            truncated,
        })
    }
}

/// Softmax of `values / temperature`, in f64.
pub fn softmax(values: &[f64], temperature: f64) -> Vec<f64> {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| ((v - max) / temperature).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}
