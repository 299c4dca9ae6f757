//! Rotary position embeddings.

use super::hparams::RopeStyle;

/// One rope configuration. The angles are built per forward call for just the positions it
/// covers, so no table for the whole context window stays in memory.
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

/// The cosines and sines of a run of positions, `head_dim / 2` of each per position.
pub struct Angles {
    half_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
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

    /// Returns the angles of positions `start..start + seq`.
    pub fn angles(&self, start: usize, seq: usize) -> Angles {
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
        Angles { half_dim: self.half_dim, cos, sin }
    }
}

impl Angles {
    /// Rotates `x`, laid out `(seq, heads, head_dim)` for the positions of these angles, in
    /// place: each pair `(a, b)` becomes `(a cos - b sin, a sin + b cos)`.
    pub fn rotate(&self, x: &mut [f32], style: RopeStyle) {
        let half = self.half_dim;
        let positions = self.cos.len() / half.max(1);
        let per_position = x.len() / positions.max(1);
        for ((x, cos), sin) in
            x.chunks_exact_mut(per_position).zip(self.cos.chunks_exact(half)).zip(self.sin.chunks_exact(half))
        {
            for head in x.chunks_exact_mut(2 * half) {
                for i in 0..half {
                    let (first, second) = match style {
                        RopeStyle::Halves => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    let (a, b) = (head[first], head[second]);
                    head[first] = a * cos[i] - b * sin[i];
                    head[second] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation turns each pair `(1, 0)` into the `(cos, sin)` of its position's angle, for
    /// both pairings.
    #[test]
    fn rotates_pairs_by_position() {
        let tables = RopeTables::new(4, 10_000.0, 1.0);
        let angles = tables.angles(3, 2);
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            // Two positions, one head of four values: first element of each pair set to 1.
            let ones = match style {
                RopeStyle::Halves => [1.0, 1.0, 0.0, 0.0],
                RopeStyle::Interleaved => [1.0, 0.0, 1.0, 0.0],
            };
            let mut x: Vec<f32> = ones.iter().chain(&ones).copied().collect();
            angles.rotate(&mut x, style);
            for pos in 0..2 {
                for i in 0..2 {
                    let (a, b) = match style {
                        RopeStyle::Halves => (x[pos * 4 + i], x[pos * 4 + i + 2]),
                        RopeStyle::Interleaved => (x[pos * 4 + 2 * i], x[pos * 4 + 2 * i + 1]),
                    };
                    let theta = (3 + pos) as f32 * 10_000f32.powf(-((2 * i) as f32) / 4.0);
                    assert!((a - theta.cos()).abs() < 1e-6, "{style:?}, position {pos}, pair {i}: cos");
                    assert!((b - theta.sin()).abs() < 1e-6, "{style:?}, position {pos}, pair {i}: sin");
                }
            }
        }
    }
}
