//! Sentence encoder: a BERT model from safetensors whose mean-pooled, L2-normalised output is
//! the sentence embedding (the all-MiniLM-L6-v2 recipe).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::Tokenizer;

/// Bounds of one forward pass of the encoder, a padded batch of token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassLimits {
    /// Sequences in one pass.
    pub max_sequences: usize,
    /// Padded tokens in one pass: the sequences times the longest of them. A single sequence
    /// longer than this still runs, alone.
    pub max_tokens: usize,
}

impl Default for PassLimits {
    /// 32 sequences, and 8,192 tokens, which is 32 inputs of the default task limit of 256
    /// tokens, so the token bound only splits batches of longer inputs.
    fn default() -> Self {
        Self {
            max_sequences: 32,
            max_tokens: 8192,
        }
    }
}

/// Groups inputs of the given token `lengths` into forward passes within `limits`, shortest
/// first, so that inputs of similar length share a pass and padding stays small. Returns the
/// input indices of each pass.
pub fn plan_passes(lengths: &[usize], limits: PassLimits) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);

    let mut passes: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for index in order {
        // Sorted ascending, so this input sets the padded width of the pass it joins.
        let padded = (current.len() + 1) * lengths[index];
        let full = current.len() >= limits.max_sequences || padded > limits.max_tokens;
        if full && !current.is_empty() {
            passes.push(std::mem::take(&mut current));
        }
        current.push(index);
    }
    if !current.is_empty() {
        passes.push(current);
    }
    passes
}

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
    #[error("invalid encoder input: {0}")]
    InvalidInput(String),
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
    /// Token ids are below this.
    pub vocab_size: usize,
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
        let vocab_size = settings["vocab_size"].as_u64().unwrap_or(0) as usize;
        // Three positions hold [CLS], one token and [SEP].
        if dim == 0 || max_tokens < 3 || vocab_size == 0 {
            return Err(EncoderError::InvalidConfig {
                path: config_path,
                message: "`hidden_size` and `vocab_size` must be positive integers and `max_position_embeddings` at least 3".into(),
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
            vocab_size,
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

    /// Checks that the model can run `ids`: at least one token, at most `max_tokens`, and
    /// every id inside the vocabulary.
    pub fn check(&self, ids: &[u32]) -> Result<(), EncoderError> {
        if ids.is_empty() {
            return Err(EncoderError::InvalidInput("input has no tokens".into()));
        }
        if ids.len() > self.max_tokens {
            return Err(EncoderError::InvalidInput(format!(
                "input has {} tokens, the encoder accepts at most {}",
                ids.len(),
                self.max_tokens
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EncoderError::InvalidInput(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// Embeds tokenized inputs in passes of the default [`PassLimits`]; returns one
    /// unit-length vector of `dim` values per input, in input order.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EncoderError> {
        self.embed_with(inputs, PassLimits::default())
    }

    /// Embeds tokenized inputs in passes within `limits`, in input order.
    pub fn embed_with(&self, inputs: &[Vec<u32>], limits: PassLimits) -> Result<Vec<Vec<f32>>, EncoderError> {
        for ids in inputs {
            self.check(ids)?;
        }
        let lengths: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let mut embeddings = vec![Vec::new(); inputs.len()];
        for pass in plan_passes(&lengths, limits) {
            let batch: Vec<&[u32]> = pass.iter().map(|&i| inputs[i].as_slice()).collect();
            for (&index, embedding) in pass.iter().zip(self.embed_batch(&batch)?) {
                embeddings[index] = embedding;
            }
        }
        Ok(embeddings)
    }

    /// Runs one forward pass over `batch`, padded to its longest input, and returns the
    /// embeddings in batch order. Each input must pass [`SentenceEncoder::check`].
    pub fn embed_batch(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        let width = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        if width == 0 {
            return Ok(vec![vec![0.0; self.dim]; batch.len()]);
        }
        if width > self.max_tokens {
            return Err(EncoderError::InvalidInput(format!(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_sequences: usize, max_tokens: usize) -> PassLimits {
        PassLimits {
            max_sequences,
            max_tokens,
        }
    }

    #[test]
    fn passes_sort_by_length() {
        let passes = plan_passes(&[9, 3, 7, 5], limits(2, 1000));
        assert_eq!(passes, [vec![1, 3], vec![2, 0]]);
    }

    #[test]
    fn passes_respect_token_bound() {
        // 3 + 3 fit in 6 padded tokens; a third input of 4 would pad the pass to 12.
        let passes = plan_passes(&[3, 4, 3, 4], limits(32, 8));
        assert_eq!(passes, [vec![0, 2], vec![1, 3]]);
        for pass in &passes {
            let width = pass.iter().map(|&i| [3, 4, 3, 4][i]).max().unwrap();
            assert!(pass.len() * width <= 8, "{pass:?}");
        }
    }

    #[test]
    fn long_input_runs_alone() {
        let passes = plan_passes(&[2, 50, 2], limits(32, 10));
        assert_eq!(passes, [vec![0, 2], vec![1]]);
    }

    #[test]
    fn every_input_planned_once() {
        let lengths: Vec<usize> = (0..100).map(|i| 3 + (i * 37) % 61).collect();
        let passes = plan_passes(&lengths, limits(7, 300));
        let mut seen: Vec<usize> = passes.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(passes.iter().all(|pass| pass.len() <= 7));
        assert!(plan_passes(&[], limits(7, 300)).is_empty());
    }
}
