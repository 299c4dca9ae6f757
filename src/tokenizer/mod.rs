//! Tokenizers for GGUF models: built from the file's metadata, or read from a `tokenizer.json`
//! beside it, which takes precedence.

mod bytes;
mod gguf;
mod stream;

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
pub use bytes::token_bytes;
pub use gguf::{tokenizer_from_gguf, SpecialTokens};
pub use stream::StreamDecoder;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("invalid tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported GGUF tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("failed to build the tokenizer: {0}")]
    Build(String),
    #[error("failed to read {path}: {message}")]
    File { path: String, message: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Loads the tokenizer of the GGUF file at `model_path`: `tokenizer.json` in the same folder
/// when present, otherwise the vocabulary in the GGUF metadata. Special token ids always come
/// from the GGUF metadata.
pub fn load(model_path: &Path, content: &Content) -> Result<(Tokenizer, SpecialTokens), TokenizerError> {
    let (from_gguf, specials) = tokenizer_from_gguf(content)?;
    let beside = model_path.with_file_name("tokenizer.json");
    if !beside.is_file() {
        return Ok((from_gguf, specials));
    }
    let tokenizer = Tokenizer::from_file(&beside).map_err(|e| TokenizerError::File {
        path: beside.display().to_string(),
        message: e.to_string(),
    })?;
    tracing::info!(path = %beside.display(), "using tokenizer.json beside the model");
    Ok((tokenizer, specials))
}
