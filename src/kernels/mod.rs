//! CPU kernels for quantized weights.
//!
//! `activation` quantizes activations exactly as llama.cpp's CPU backend does, and `qmatmul`
//! multiplies them against GGUF weight blocks: through the row-interleaved panels of `panel`
//! (Q5_0) and `panel_kquant` (Q4_K, Q6_K) and the tiled kernels of `gemm` (Q8_0, Q4_1) where
//! the CPU has AVX2, with candle's block dot products otherwise. Matching llama.cpp bit for bit in the activation step is what keeps
//! tierd's logits within a few hundredths of the reference instead of a few tenths.

pub mod activation;
pub mod attention;
mod cpu;
pub mod gemm;
pub mod gelu;
mod layout;
pub mod panel;
pub mod panel_kquant;
pub mod qmatmul;
mod spin_pool;

pub use qmatmul::QWeight;

#[cfg(test)]
mod tests {
    /// Returns `len` values spread over [-1, 1] by a multiplicative hash of their index.
    pub fn sample(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 16) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }
}
