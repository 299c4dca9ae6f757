//! Dot products of weight blocks with quantized activations: Q5_0 × Q8_0 and Q4_1 × Q8_1,
//! whose candle kernels are scalar, and Q8_0 × Q8_0, whose candle kernel is slower. Qwen2.5 and
//! Gemma 3 Q4_K_M files store every matrix whose width is not a multiple of 256 as Q5_0, and
//! SmolLM2's Q4_1 file uses Q4_1 for every matrix.
//!
//! The AVX2 and VNNI versions are chosen at run time, so one binary serves every x86-64
//! machine; other machines use candle's kernels.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0, BlockQ8_1, GgmlType};

use super::layout::{view, Q4_1, Q5_0, Q8_0, Q8_1};

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

pub fn dot_q5_0(n: usize, xs: &[BlockQ5_0], ys: &[BlockQ8_0]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { avx2::dot_q5_0(view::<Q5_0>(xs), view::<Q8_0>(ys)) };
    }
    BlockQ5_0::vec_dot(n, xs, ys)
}

/// Returns whether the CPU has `vpdpbusd` on 256-bit registers through AVX-512 VNNI and VL.
// NOTE: CPUs with only AVX-VNNI (no AVX-512) take the AVX2 path.
#[cfg(target_arch = "x86_64")]
pub(super) fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        has_avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    })
}

/// Computes Q8_0 × Q8_0, the type of Gemma 3's tied output matrix, whose 262,144 rows dominate
/// a decode step. candle's AVX2 kernel chains every multiply-add through one accumulator. This
/// one keeps two, and uses VNNI where the CPU has it.
pub fn dot_q8_0(n: usize, xs: &[BlockQ8_0], ys: &[BlockQ8_0]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_vnni() {
            // SAFETY: AVX2, FMA, AVX-512 VNNI and AVX-512 VL were detected on this CPU.
            return unsafe { vnni::dot_q8_0(view::<Q8_0>(xs), view::<Q8_0>(ys)) };
        }
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            return unsafe { avx2::dot_q8_0(view::<Q8_0>(xs), view::<Q8_0>(ys)) };
        }
    }
    BlockQ8_0::vec_dot(n, xs, ys)
}

pub fn dot_q4_1(n: usize, xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { avx2::dot_q4_1(view::<Q4_1>(xs), view::<Q8_1>(ys)) };
    }
    BlockQ4_1::vec_dot(n, xs, ys)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::kernels::layout::{Q4_1, Q5_0, Q8_0, Q8_1};

    /// Expands 16 bytes of packed nibbles to 32 bytes: low nibbles first, then high nibbles,
    /// which is the element order of Q4 and Q5 blocks.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        let packed = _mm_loadu_si128(qs.as_ptr().cast());
        let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        _mm256_set_m128i(high, low)
    }

    /// Returns 0x10 in byte `i` where bit `i` of `bits` is set, 0 elsewhere.
    #[target_feature(enable = "avx2")]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Sums the products of 32 signed bytes in eight i32 lanes, as f32.
    #[target_feature(enable = "avx2")]
    unsafe fn dot_i8(x: __m256i, y: __m256i) -> __m256 {
        let x_abs = _mm256_sign_epi8(x, x);
        let y_signed = _mm256_sign_epi8(y, x);
        let pairs = _mm256_maddubs_epi16(x_abs, y_signed);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal_sum(v: __m256) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
        _mm_cvtss_f32(sum)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q5_0(xs: &[Q5_0], ys: &[Q8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys) {
            let high = u32::from_le_bytes(x.qh);
            let values = _mm256_or_si256(nibbles(&x.qs), fifth_bits(high));
            let values = _mm256_sub_epi8(values, _mm256_set1_epi8(16));
            let other = _mm256_loadu_si256(y.qs.as_ptr().cast());
            let scale = _mm256_set1_ps(x.d.to_f32() * y.d.to_f32());
            acc = _mm256_fmadd_ps(scale, dot_i8(values, other), acc);
        }
        horizontal_sum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(xs: &[Q8_0], ys: &[Q8_0]) -> f32 {
        // Two accumulators, so that consecutive blocks' multiply-adds do not wait on each other.
        let mut even = _mm256_setzero_ps();
        let mut odd = _mm256_setzero_ps();
        let mut pairs = xs.chunks_exact(2).zip(ys.chunks_exact(2));
        for (x, y) in &mut pairs {
            even = _mm256_fmadd_ps(scale(&x[0], &y[0]), dot_i8(load(&x[0]), load(&y[0])), even);
            odd = _mm256_fmadd_ps(scale(&x[1], &y[1]), dot_i8(load(&x[1]), load(&y[1])), odd);
        }
        if let (Some(x), Some(y)) = (xs.chunks_exact(2).remainder().first(), ys.chunks_exact(2).remainder().first()) {
            even = _mm256_fmadd_ps(scale(x, y), dot_i8(load(x), load(y)), even);
        }
        horizontal_sum(_mm256_add_ps(even, odd))
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn load(block: &Q8_0) -> __m256i {
        _mm256_loadu_si256(block.qs.as_ptr().cast())
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scale(x: &Q8_0, y: &Q8_0) -> __m256 {
        _mm256_set1_ps(x.d.to_f32() * y.d.to_f32())
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(xs: &[Q4_1], ys: &[Q8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0f32;
        for (x, y) in xs.iter().zip(ys) {
            let values = nibbles(&x.qs);
            let other = _mm256_loadu_si256(y.qs.as_ptr().cast());
            // Unsigned nibbles times signed bytes: maddubs takes them as they are.
            let pairs = _mm256_maddubs_epi16(values, other);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
            let scale = _mm256_set1_ps(x.d.to_f32() * y.d.to_f32());
            acc = _mm256_fmadd_ps(scale, sums, acc);
            offsets += x.m.to_f32() * y.s.to_f32();
        }
        horizontal_sum(acc) + offsets
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::avx2::{horizontal_sum, load, scale};
    use crate::kernels::layout::Q8_0;

    /// Sums the products of 32 signed bytes in eight i32 lanes, as f32, with one `vpdpbusd`
    /// in place of AVX2's two-step multiply and widen.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn dot_i8(x: __m256i, y: __m256i) -> __m256 {
        let x_abs = _mm256_sign_epi8(x, x);
        let y_signed = _mm256_sign_epi8(y, x);
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), x_abs, y_signed))
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub unsafe fn dot_q8_0(xs: &[Q8_0], ys: &[Q8_0]) -> f32 {
        let mut even = _mm256_setzero_ps();
        let mut odd = _mm256_setzero_ps();
        let mut pairs = xs.chunks_exact(2).zip(ys.chunks_exact(2));
        for (x, y) in &mut pairs {
            even = _mm256_fmadd_ps(scale(&x[0], &y[0]), dot_i8(load(&x[0]), load(&y[0])), even);
            odd = _mm256_fmadd_ps(scale(&x[1], &y[1]), dot_i8(load(&x[1]), load(&y[1])), odd);
        }
        if let (Some(x), Some(y)) = (xs.chunks_exact(2).remainder().first(), ys.chunks_exact(2).remainder().first()) {
            even = _mm256_fmadd_ps(scale(x, y), dot_i8(load(x), load(y)), even);
        }
        horizontal_sum(_mm256_add_ps(even, odd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activation::{quantize_q8_0, quantize_q8_1};
    use crate::kernels::tests::sample;

    #[test]
    fn q5_0_matches_scalar_reference() {
        let n = 32 * 24;
        let mut weights = vec![BlockQ5_0::zeros(); n / 32];
        BlockQ5_0::from_float(&sample(n, 1), &mut weights);
        let mut activations = vec![BlockQ8_0::zeros(); n / 32];
        quantize_q8_0(&sample(n, 2), &mut activations);
        let fast = dot_q5_0(n, &weights, &activations);
        let scalar = BlockQ5_0::vec_dot_unopt(n, &weights, &activations);
        assert!((fast - scalar).abs() <= 1e-4 * scalar.abs().max(1.0), "{fast} vs {scalar}");
    }

    /// Every path this CPU has (VNNI, AVX2, candle's) against the scalar reference, with an
    /// odd block count so that the second accumulator's remainder is used.
    #[test]
    fn q8_0_matches_scalar_reference() {
        let n = 32 * 21;
        let mut weights = vec![BlockQ8_0::zeros(); n / 32];
        BlockQ8_0::from_float(&sample(n, 5), &mut weights);
        let mut activations = vec![BlockQ8_0::zeros(); n / 32];
        quantize_q8_0(&sample(n, 6), &mut activations);
        let scalar = BlockQ8_0::vec_dot_unopt(n, &weights, &activations);
        let mut results = vec![("dispatched", dot_q8_0(n, &weights, &activations))];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: AVX2 and FMA were detected.
                let fast = unsafe { avx2::dot_q8_0(view::<Q8_0>(&weights), view::<Q8_0>(&activations)) };
                results.push(("avx2", fast));
            }
            if has_vnni() {
                // SAFETY: the VNNI features were detected.
                let fast = unsafe { vnni::dot_q8_0(view::<Q8_0>(&weights), view::<Q8_0>(&activations)) };
                results.push(("vnni", fast));
            }
        }
        for (path, fast) in results {
            assert!((fast - scalar).abs() <= 1e-4 * scalar.abs().max(1.0), "{path}: {fast} vs {scalar}");
        }
    }

    #[test]
    fn q4_1_matches_scalar_reference() {
        let n = 32 * 24;
        let mut weights = vec![BlockQ4_1::zeros(); n / 32];
        BlockQ4_1::from_float(&sample(n, 3), &mut weights);
        let mut activations = vec![BlockQ8_1::zeros(); n / 32];
        quantize_q8_1(&sample(n, 4), &mut activations);
        let fast = dot_q4_1(n, &weights, &activations);
        let scalar = BlockQ4_1::vec_dot_unopt(n, &weights, &activations);
        assert!((fast - scalar).abs() <= 1e-4 * scalar.abs().max(1.0), "{fast} vs {scalar}");
    }
}
