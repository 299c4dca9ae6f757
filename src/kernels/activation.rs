//! Quantization of f32 activations into the 8-bit blocks that GGUF weight types are dotted with.
//!
//! These follow llama.cpp's CPU backend (ggml-cpu, x86 build) exactly. Q8_0 and Q8_1 scale by
//! `127 / max|x|` and round half to even (`_mm256_round_ps` with `_MM_ROUND_NEAREST`). Q8_K
//! uses `-127 / x_max`, where `x_max` is the first element of largest magnitude, with the same
//! rounding (ggml's `nearest_int`). candle's own quantizers round half away from zero, scale by
//! `1 / (max / 127)` and compute the Q8_1 sum in f16, which moves logits by up to 0.4.

use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType};
use half::f16;

pub use super::layout::{QK8, QK_K};
use super::layout::{view_mut, Q8K, Q8_0, Q8_1};

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |max, x| max.max(x.abs()))
}

/// Writes `round_ties_even(x * scale)` of each of the 32 values of `xs` into `out`.
fn round_block(xs: &[f32], scale: f32, out: &mut [i8; QK8]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: AVX2 was detected; `round_32` checks the lengths.
        unsafe { x86::round_32(xs, scale, out) };
        return;
    }
    for (q, x) in out.iter_mut().zip(xs) {
        *q = (x * scale).round_ties_even() as i8;
    }
}

/// Returns the largest magnitude in `xs`.
fn block_max_abs(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { x86::max_abs(xs) };
    }
    max_abs(xs)
}

pub fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    let out: &mut [Q8_0] = view_mut(out);
    for (block, xs) in out.iter_mut().zip(xs.chunks_exact(QK8)) {
        let max = block_max_abs(xs);
        let d = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        block.d = f16::from_f32(d);
        round_block(xs, id, &mut block.qs);
    }
}

pub fn quantize_q8_1(xs: &[f32], out: &mut [BlockQ8_1]) {
    let out: &mut [Q8_1] = view_mut(out);
    for (block, xs) in out.iter_mut().zip(xs.chunks_exact(QK8)) {
        let max = block_max_abs(xs);
        let d = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        round_block(xs, id, &mut block.qs);
        let sum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
        block.d = f16::from_f32(d);
        block.s = f16::from_f32(d * sum as f32);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::QK8;

    /// Returns the largest magnitude in `xs`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max_abs(xs: &[f32]) -> f32 {
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut max = _mm256_setzero_ps();
        let chunks = xs.chunks_exact(8);
        let rest = chunks.remainder();
        for chunk in chunks {
            max = _mm256_max_ps(max, _mm256_and_ps(_mm256_loadu_ps(chunk.as_ptr()), magnitude));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), max);
        lanes.iter().chain(rest).fold(0f32, |max, x| max.max(x.abs()))
    }

    /// Writes `round_ties_even(x * scale)` of the 32 values of `xs` into `out`, as the scalar
    /// loop does: the products are the same IEEE multiplications and the rounding mode is
    /// round-to-nearest-even.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn round_32(xs: &[f32], scale: f32, out: &mut [i8; QK8]) {
        assert!(xs.len() >= QK8, "a block of {QK8} values, given {}", xs.len());
        let scale = _mm256_set1_ps(scale);
        let mut ints = [_mm256_setzero_si256(); 4];
        for (i, int) in ints.iter_mut().enumerate() {
            let product = _mm256_mul_ps(_mm256_loadu_ps(xs.as_ptr().add(8 * i)), scale);
            let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(product);
            *int = _mm256_cvtps_epi32(rounded);
        }
        // The packs interleave the 128-bit lanes; the permutation puts the values back in order.
        let words = _mm256_packs_epi32(ints[0], ints[1]);
        let words_high = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_packs_epi16(words, words_high);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr().cast(), ordered);
    }
}

pub fn quantize_q8k(xs: &[f32], out: &mut [BlockQ8K]) {
    let out: &mut [Q8K] = view_mut(out);
    for (block, xs) in out.iter_mut().zip(xs.chunks_exact(QK_K)) {
        let amax = block_max_abs(xs);
        if amax == 0.0 {
            block.d = 0.0;
            block.qs.fill(0);
            block.bsums.fill(0);
            continue;
        }
        // The first element of largest magnitude, sign included, as llama.cpp's scan keeps it.
        let max = xs.iter().copied().find(|x| x.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        // `|iscale * x| <= 127` up to rounding, and both rounding paths saturate at 127 as
        // llama.cpp's `MIN(127, ...)` does.
        for (qs, xs) in block.qs.chunks_exact_mut(QK8).zip(xs.chunks_exact(QK8)) {
            if let Ok(qs) = <&mut [i8; QK8]>::try_from(qs) {
                round_block(xs, iscale, qs);
            }
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// Activation block types with a llama.cpp-compatible quantizer.
pub trait ActivationBlock: GgmlType {
    fn quantize(xs: &[f32], out: &mut [Self]);
}

impl ActivationBlock for BlockQ8_0 {
    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8_0(xs, out)
    }
}

impl ActivationBlock for BlockQ8_1 {
    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8_1(xs, out)
    }
}

impl ActivationBlock for BlockQ8K {
    fn quantize(xs: &[f32], out: &mut [Self]) {
        quantize_q8k(xs, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD rounding equals the scalar loop bit for bit, ties included, and so does the
    /// largest magnitude.
    #[test]
    fn simd_rounding_equals_scalar() {
        let mut xs = crate::kernels::tests::sample(QK8 * 40, 9);
        xs[3] = 2.5;
        xs[4] = -3.5;
        xs[40] = 0.0;
        for block in xs.chunks_exact(QK8) {
            for scale in [127.0 / max_abs(block), 1.0, 0.0] {
                let mut fast = [0i8; QK8];
                round_block(block, scale, &mut fast);
                let scalar: Vec<i8> = block.iter().map(|x| (x * scale).round_ties_even() as i8).collect();
                assert_eq!(fast.to_vec(), scalar, "scale {scale}");
            }
            assert_eq!(block_max_abs(block), max_abs(block));
        }
    }

    #[test]
    fn q8_0_rounds_half_to_even() {
        // max 127 gives id 1.0, so 2.5 and 3.5 are exact ties.
        let mut xs = vec![0f32; QK8];
        xs[0] = 127.0;
        xs[1] = 2.5;
        xs[2] = 3.5;
        xs[3] = -2.5;
        let mut out = vec![BlockQ8_0::zeros(); 1];
        quantize_q8_0(&xs, &mut out);
        let view: &mut [Q8_0] = view_mut(&mut out);
        assert_eq!(&view[0].qs[..4], &[127, 2, 4, -2]);
    }

    #[test]
    fn q8k_maps_extreme_to_minus_127() {
        let mut xs: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) / 10.0).collect();
        xs[7] = 50.0;
        let mut out = vec![BlockQ8K::zeros(); 1];
        quantize_q8k(&xs, &mut out);
        let view: &mut [Q8K] = view_mut(&mut out);
        assert_eq!(view[0].qs[7], -127);
        let expected: i16 = view[0].qs[..16].iter().map(|&q| q as i16).sum();
        assert_eq!(view[0].bsums[0], expected);
    }

    /// The vectorized Q8_K quantizer equals llama.cpp's scalar scan bit for bit, with ties of
    /// magnitude between signs, a value on a rounding tie and an all-zero block.
    #[test]
    fn q8k_equals_scalar_scan() {
        let mut xs = crate::kernels::tests::sample(QK_K * 4, 11);
        xs[5] = -1.5;
        xs[9] = 1.5;
        xs[QK_K + 3] = 2.0;
        xs[QK_K + 4] = -2.0;
        xs[QK_K + 5] = 127.0 / 254.0;
        xs[2 * QK_K..3 * QK_K].fill(0.0);
        let mut out = vec![BlockQ8K::zeros(); 4];
        quantize_q8k(&xs, &mut out);
        let view: &mut [Q8K] = view_mut(&mut out);
        for (block, xs) in view.iter().zip(xs.chunks_exact(QK_K)) {
            let (mut max, mut amax) = (0f32, 0f32);
            for &x in xs {
                if x.abs() > amax {
                    amax = x.abs();
                    max = x;
                }
            }
            let iscale = if amax == 0.0 { 0.0 } else { -127.0 / max };
            let expected: Vec<i8> = xs.iter().map(|x| ((iscale * x).round_ties_even() as i32).min(127) as i8).collect();
            assert_eq!(block.qs.to_vec(), expected);
            assert_eq!(block.d, if amax == 0.0 { 0.0 } else { 1.0 / iscale });
        }
    }

    #[test]
    fn q8_1_sum_is_scaled_in_f32() {
        let xs: Vec<f32> = (0..QK8).map(|i| 1.0 + i as f32).collect();
        let mut out = vec![BlockQ8_1::zeros(); 1];
        quantize_q8_1(&xs, &mut out);
        let view: &mut [Q8_1] = view_mut(&mut out);
        let sum: i32 = view[0].qs.iter().map(|&q| q as i32).sum();
        let d = 32.0f32 / 127.0;
        assert_eq!(view[0].s, f16::from_f32(d * sum as f32));
    }
}
