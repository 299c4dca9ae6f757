//! Rotary position embedding tables.

use candle_core::{Device, Result, Tensor};

/// One rope configuration. The cos/sin tables are built per forward call for just the positions
/// it covers, so no table for the whole context window stays in memory.
///
/// The angles follow llama.cpp's CPU backend in f32: `theta_i = pos * base^(-2i/d)`, with the
/// power built by repeated multiplication. Computing them in f64 instead moves the logits by
/// more than llama.cpp's own run-to-run tolerance allows.
pub struct RopeTables {
    half_dim: usize,
    theta_scale: f32,
    /// Multiplies positions (linear rope scaling); 1.0 means none.
    freq_scale: f32,
}

impl RopeTables {
    pub fn new(head_dim: usize, base: f64, scale: f64) -> Self {
        let base = base as f32;
        Self {
            half_dim: head_dim / 2,
            theta_scale: base.powf(-2.0 / head_dim as f32),
            freq_scale: 1.0 / scale as f32,
        }
    }

    /// Returns `(cos, sin)`, each `(seq, head_dim / 2)`, for positions `start..start + seq`.
    pub fn tables(&self, start: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let mut cos = Vec::with_capacity(seq * self.half_dim);
        let mut sin = Vec::with_capacity(seq * self.half_dim);
        for pos in start..start + seq {
            let mut theta = pos as f32;
            for _ in 0..self.half_dim {
                let angle = self.freq_scale * theta;
                cos.push(angle.cos());
                sin.push(angle.sin());
                theta *= self.theta_scale;
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, self.half_dim), &Device::Cpu)?,
            Tensor::from_vec(sin, (seq, self.half_dim), &Device::Cpu)?,
        ))
    }
}
