//! Sentence encoder: a BERT model from safetensors whose mean-pooled, L2-normalised output is
//! the sentence embedding (the all-MiniLM-L6-v2 recipe).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use crate::engine::queue::{job_queue, JobQueue};
use crate::engine::QueueFull;

/// Sequences run through the encoder in one padded batch. Inputs are sorted by length first,
/// so padding stays small.
const BATCH_SIZE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid encoder config {path}: {source}")]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid encoder config {path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error("failed to load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("failed to load encoder weights {path}: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("failed to tokenize input: {0}")]
    Tokenize(String),
    #[error("encoder forward pass failed: {0}")]
    Forward(#[from] candle_core::Error),
    #[error("the encoder thread has stopped")]
    Stopped,
}

/// A BERT sentence encoder with its tokenizer.
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Embedding width.
    pub dim: usize,
    /// Position embeddings in the model: the longest input it accepts, in tokens.
    pub max_tokens: usize,
    pub load_time: Duration,
}

impl SentenceEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, EncoderError> {
        let started = Instant::now();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| EncoderError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|source| EncoderError::Config {
            path: config_path.clone(),
            source,
        })?;
        let settings: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| EncoderError::Config {
                path: config_path.clone(),
                source,
            })?;
        let dim = settings["hidden_size"].as_u64().unwrap_or(0) as usize;
        let max_tokens = settings["max_position_embeddings"].as_u64().unwrap_or(0) as usize;
        // Three positions hold [CLS], one token and [SEP].
        if dim == 0 || max_tokens < 3 {
            return Err(EncoderError::InvalidConfig {
                path: config_path,
                message: "`hidden_size` must be a positive integer and `max_position_embeddings` at least 3".into(),
            });
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| EncoderError::Tokenizer {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
        // Truncation is the task's decision and padding is done per batch here, so the
        // settings stored in tokenizer.json are cleared.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EncoderError::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;

        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            return Err(EncoderError::Io {
                path: weights_path,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        // SAFETY: the file is mapped read-only and tierd never writes model files while serving.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, &Device::Cpu) }
            .map_err(|source| EncoderError::Weights {
                path: weights_path.clone(),
                source,
            })?;
        let model = BertModel::load(vb, &config).map_err(|source| EncoderError::Weights {
            path: weights_path.clone(),
            source,
        })?;
        Ok(Self {
            model,
            tokenizer,
            dim,
            max_tokens,
            load_time: started.elapsed(),
        })
    }

    /// Tokenizes `text` with the `[CLS]` and `[SEP]` markers and no truncation.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| EncoderError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Shortens `ids` to `limit` tokens, keeping the final `[SEP]` marker.
    pub fn truncate(ids: &mut Vec<u32>, limit: usize) {
        if ids.len() > limit && limit >= 2 {
            let sep = ids[ids.len() - 1];
            ids.truncate(limit - 1);
            ids.push(sep);
        }
    }

    /// Embeds tokenized inputs; returns one unit-length vector of `dim` values per input, in
    /// input order.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EncoderError> {
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let mut embeddings = vec![Vec::new(); inputs.len()];
        for chunk in order.chunks(BATCH_SIZE) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| inputs[i].as_slice()).collect();
            for (&index, embedding) in chunk.iter().zip(self.embed_batch(&batch)?) {
                embeddings[index] = embedding;
            }
        }
        Ok(embeddings)
    }

    fn embed_batch(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        let width = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        if width == 0 {
            return Ok(vec![vec![0.0; self.dim]; batch.len()]);
        }
        if width > self.max_tokens {
            return Err(EncoderError::Tokenize(format!(
                "input has {width} tokens, the encoder accepts at most {}",
                self.max_tokens
            )));
        }
        let mut ids = vec![0u32; batch.len() * width];
        let mut mask = vec![0u32; batch.len() * width];
        for (row, input) in batch.iter().enumerate() {
            ids[row * width..row * width + input.len()].copy_from_slice(input);
            mask[row * width..row * width + input.len()].fill(1);
        }
        let shape = (batch.len(), width);
        let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;

        // Mean over the real tokens only, then scale to unit length.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2()?)
    }
}

/// The embeddings of one job's inputs, in order, or why they could not be computed.
type EmbedResult = Result<Vec<Vec<f32>>, EncoderError>;

struct EncodeJob {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<EmbedResult>,
    span: tracing::Span,
}

/// Most inputs gathered from queued jobs into one run of the encoder; a single larger job
/// still runs whole.
const MAX_BATCH_INPUTS: usize = 256;

/// Embeds the inputs of all `jobs` in one call and returns each job its share. When the
/// combined call fails, each job runs alone, so every client gets the error of its own inputs.
fn run_jobs(encoder: &SentenceEncoder, jobs: Vec<EncodeJob>) {
    if jobs.is_empty() {
        return;
    }
    if jobs.len() == 1 {
        for job in jobs {
            let _enter = job.span.enter();
            // The receiver may have gone while the batch ran; nothing is owed to it.
            let _ = job.reply.send(encoder.embed(&job.inputs));
        }
        return;
    }
    let combined: Vec<Vec<u32>> = jobs.iter().flat_map(|job| job.inputs.iter().cloned()).collect();
    tracing::debug!(jobs = jobs.len(), inputs = combined.len(), "embedding queued jobs together");
    match encoder.embed(&combined) {
        Ok(embeddings) => {
            let mut embeddings = embeddings.into_iter();
            for job in jobs {
                let share: Vec<Vec<f32>> = embeddings.by_ref().take(job.inputs.len()).collect();
                let _ = job.reply.send(Ok(share));
            }
        }
        Err(error) => {
            tracing::warn!(%error, jobs = jobs.len(), "combined encoder batch failed; running jobs one by one");
            for job in jobs {
                run_jobs(encoder, vec![job]);
            }
        }
    }
}

/// A loaded encoder with its own thread and bounded queue, shared by every task that uses it.
/// Requests that wait while a batch runs are embedded together in the next one.
pub struct EncoderWorker {
    pub id: String,
    pub encoder: Arc<SentenceEncoder>,
    queue: JobQueue<EncodeJob>,
}

impl EncoderWorker {
    pub fn spawn(id: &str, encoder: SentenceEncoder, capacity: usize) -> std::io::Result<Self> {
        let encoder = Arc::new(encoder);
        let (queue, receiver) = job_queue::<EncodeJob>(id, capacity);
        let thread_encoder = encoder.clone();
        std::thread::Builder::new()
            .name(format!("encode-{id}"))
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    // Jobs that queued up while the previous batch ran are embedded together.
                    let mut jobs = vec![first];
                    let mut inputs = jobs[0].inputs.len();
                    while inputs < MAX_BATCH_INPUTS {
                        let Some(job) = receiver.try_recv() else {
                            break;
                        };
                        inputs += job.inputs.len();
                        jobs.push(job);
                    }
                    jobs.retain(|job| {
                        let open = !job.reply.is_closed();
                        if !open {
                            let _enter = job.span.enter();
                            tracing::info!("client left while queued, skipping");
                        }
                        open
                    });
                    run_jobs(&thread_encoder, jobs);
                }
            })?;
        Ok(Self {
            id: id.to_string(),
            encoder,
            queue,
        })
    }

    /// Queues `inputs` for embedding; fails at once with [`QueueFull`] when the queue is full.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
    ) -> Result<oneshot::Receiver<EmbedResult>, QueueFull> {
        let (reply, receiver) = oneshot::channel();
        let job = EncodeJob {
            inputs,
            reply,
            span: tracing::Span::current(),
        };
        self.queue.push(job)?;
        Ok(receiver)
    }

    /// Embeds `inputs` on the encoder thread and waits for the result.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, ClassifyQueueError> {
        let receiver = self.submit(inputs).map_err(ClassifyQueueError::Full)?;
        receiver
            .await
            .map_err(|_| ClassifyQueueError::Encoder(EncoderError::Stopped))?
            .map_err(ClassifyQueueError::Encoder)
    }
}

/// Failure of a queued encoder job.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyQueueError {
    #[error(transparent)]
    Full(QueueFull),
    #[error(transparent)]
    Encoder(EncoderError),
}
