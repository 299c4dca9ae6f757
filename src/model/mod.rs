//! Quantized decoder models loaded from GGUF files.
//!
//! `hparams` reads the architecture from the metadata, and `transformer` runs it over the
//! quantized matmuls in `crate::kernels`. `kv_cache` stores one sequence's attention state, and
//! `rope` builds the position tables. The engine calls models through [`LanguageModel`].

pub mod hparams;
pub mod kv_cache;
mod rope;
mod tensor_loader;
pub mod transformer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Content;
use candle_core::Tensor;
pub use hparams::{Architecture, HParams};
pub use kv_cache::KvCache;
use tokenizers::Tokenizer;
pub use transformer::Transformer;

use crate::tokenizer::{SpecialTokens, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("unsupported architecture `{0}` (supported: llama, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata key `{0}` is missing")]
    MissingMetadata(String),
    #[error("invalid GGUF metadata: {0}")]
    InvalidMetadata(String),
    #[error("GGUF tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("failed to load tensor `{name}`: {source}")]
    Tensor {
        name: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A causal language model: runs tokens through the network and returns next-token logits.
pub trait LanguageModel: Send + Sync {
    fn hparams(&self) -> &HParams;

    /// Creates an empty cache for one sequence of at most `max_len` positions.
    fn new_cache(&self, max_len: usize) -> KvCache;

    /// Runs `tokens` at the cache's next positions; returns the f32 logits `(n_vocab,)` of the
    /// last token.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor>;

    /// Runs `tokens` like `forward` and returns every token's final hidden state after the
    /// output norm, `(tokens.len(), n_embd)`.
    fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor>;

    /// Returns the logits of the vocabulary entries `ids` for each row of `hidden`,
    /// `(rows, ids.len())`, without computing the rest of the vocabulary.
    fn output_rows(&self, hidden: &Tensor, ids: &[u32]) -> candle_core::Result<Tensor>;
}

impl LanguageModel for Transformer {
    fn hparams(&self) -> &HParams {
        Transformer::hparams(self)
    }

    fn new_cache(&self, max_len: usize) -> KvCache {
        Transformer::new_cache(self, max_len)
    }

    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        Transformer::forward(self, tokens, cache)
    }

    fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        Transformer::forward_hidden(self, tokens, cache)
    }

    fn output_rows(&self, hidden: &Tensor, ids: &[u32]) -> candle_core::Result<Tensor> {
        Transformer::output_rows(self, hidden, ids)
    }
}

/// A model with everything needed to serve it.
pub struct LoadedModel {
    pub network: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// `tokenizer.chat_template` from the GGUF metadata, if the file has one.
    pub chat_template: Option<String>,
    pub file_size: u64,
    pub load_time: Duration,
}

impl LoadedModel {
    /// Loads a GGUF file: metadata, weights and tokenizer.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let started = Instant::now();
        let io_error = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let file_size = file.metadata().map_err(io_error)?.len();
        let content = Content::read(&mut file).map_err(|source| ModelError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;

        let hparams = HParams::from_gguf(&content)?;
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|value| value.to_string().ok())
            .cloned();

        // The tokenizer is built before the weights are read: building Gemma's 262k-entry
        // vocabulary briefly takes about twice its final memory, and that peak must not add to
        // the weights. The metadata is no longer needed once the tokenizer exists.
        let started_tokenizer = Instant::now();
        let (tokenizer, special) = crate::tokenizer::load(path, &content)?;
        tracing::debug!(ms = started_tokenizer.elapsed().as_millis() as u64, "tokenizer built");
        let mut content = content;
        content.metadata.clear();
        release_free_heap();

        let network = Transformer::load(path, &content, hparams)?;

        Ok(Self {
            network: Box::new(network),
            tokenizer,
            special,
            chat_template,
            file_size,
            load_time: started.elapsed(),
        })
    }
}

/// Returns freed heap pages to the operating system, so transient allocations of loading do
/// not stay in the resident set.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that the allocator has already freed.
    unsafe {
        libc::malloc_trim(0);
    }
}
