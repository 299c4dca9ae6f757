//! Rotary position embedding tables.

use candle_core::{Device, Result, Tensor};

/// Inverse frequencies of one rope configuration; cos/sin tables are built per forward call for
/// just the positions it covers, so no table for the whole context window is kept in memory.
pub struct RopeTables {
    inv_freq: Vec<f64>,
    /// Positions are divided by this factor (linear rope scaling); 1.0 means none.
    scale: f64,
}

impl RopeTables {
    pub fn new(head_dim: usize, base: f64, scale: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| base.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        Self { inv_freq, scale }
    }

    /// Returns `(cos, sin)`, each `(seq, head_dim / 2)`, for positions `start..start + seq`.
    pub fn tables(&self, start: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for pos in start..start + seq {
            let pos = pos as f64 / self.scale;
            for freq in &self.inv_freq {
                let angle = pos * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (seq, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (seq, half), &Device::Cpu)?,
        ))
    }
}
