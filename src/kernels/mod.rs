//! CPU kernels for quantized weights.
//!
//! `activation` quantizes activations exactly as llama.cpp's CPU backend does, and `qmatmul`
//! multiplies them against GGUF weight blocks with candle's block dot products. Matching
//! llama.cpp bit for bit in the activation step is what keeps tierd's logits within a few
//! hundredths of the reference instead of a few tenths.

pub mod activation;
pub mod dot;
pub mod gelu;
mod layout;
pub mod qmatmul;

pub use qmatmul::QWeight;
