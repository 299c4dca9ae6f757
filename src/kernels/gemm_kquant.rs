//! Tiled products of K-quant weight rows (Q4_K, Q6_K) with many Q8_K activation rows, for
//! prompt processing. Q4_K_M files store these types for every matrix whose width is a multiple
//! of 256: Gemma 3's attention output and feed-forward down projections, Qwen2.5's down
//! projections.
//!
//! A 256-element super-block is handled as eight groups of 32 elements. For each group, every
//! weight row's values are unpacked to unsigned bytes once and multiplied with each activation
//! row (`vpmaddubsw`), then weighted by the group's scales (`vpmaddwd`, or `vpdpwssd` with
//! VNNI) into i32 lanes. At the end of the super-block the lanes are scaled to f32. The
//! weights' offset (Q4_K's minimums, Q6_K's 32) is removed with the activation's sums of 16
//! elements, also spread over the lanes, so that no lane sum is needed until the output.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K};

#[cfg(target_arch = "x86_64")]
use super::gemm::dispatch;
#[cfg(target_arch = "x86_64")]
use super::layout::{Q4K, Q6K, Q8K};

/// Fills `out`, laid out weight-row-major (`m` values per weight row), with the products of the
/// Q4_K weight rows in `weights` (`blocks` super-blocks each) and the `m` activation rows in
/// `activations`. Returns `false`, leaving `out` untouched, when this CPU has no tiled kernel.
pub fn q4k_rows(weights: &[BlockQ4K], activations: &[BlockQ8K], blocks: usize, m: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return dispatch::<Q4K, Q8K>(weights, activations, blocks, m, out, x86::q4k_vnni, x86::q4k_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// [`q4k_rows`] for Q6_K weights.
pub fn q6k_rows(weights: &[BlockQ6K], activations: &[BlockQ8K], blocks: usize, m: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return dispatch::<Q6K, Q8K>(weights, activations, blocks, m, out, x86::q6k_vnni, x86::q6k_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::kernels::gemm::x86::horizontal_sum;
    use crate::kernels::gemm::Shape;
    use crate::kernels::layout::{Q4K, Q6K, Q8K};

    /// Groups of 32 elements in a super-block.
    const GROUPS: usize = 8;

    /// A weight super-block's scales as held for the whole tile row.
    #[derive(Clone, Copy)]
    struct Scales {
        /// For each group, the i16 scale of each of its 16 byte pairs.
        groups: [__m256i; GROUPS],
        /// For each 16-element run, the i16 weight of the activation's sum of that run in the
        /// offset term.
        offsets: __m256i,
        /// The super-block scale.
        scale: f32,
        /// The factor of the offset term.
        offset_scale: f32,
    }

    /// One K-quant type's part of a tiled product.
    trait SuperBlock {
        /// Decodes the super-block's scales.
        unsafe fn scales(&self) -> Scales;
        /// Returns the unsigned values of group `group`.
        unsafe fn group(&self, group: usize) -> __m256i;
    }

    impl SuperBlock for Q4K {
        #[inline(always)]
        unsafe fn scales(&self) -> Scales {
            // Eight 6-bit scales and eight 6-bit minimums are packed in 12 bytes. The first four
            // of each are the low six bits of bytes 0..8. The last four are split over bytes
            // 8..12 (low nibbles for scales, high nibbles for minimums) and the top two bits of
            // bytes 0..8.
            let q = &self.scales;
            let mut scales = [0i16; GROUPS];
            let mut mins = [0i16; 2 * GROUPS];
            for j in 0..GROUPS {
                let (scale, min) = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                };
                scales[j] = i16::from(scale);
                // Each group of 32 covers two of the activation's 16-element sums.
                mins[2 * j] = i16::from(min);
                mins[2 * j + 1] = i16::from(min);
            }
            let mut groups = [_mm256_setzero_si256(); GROUPS];
            for (vector, &scale) in groups.iter_mut().zip(&scales) {
                *vector = _mm256_set1_epi16(scale);
            }
            Scales {
                groups,
                offsets: _mm256_loadu_si256(mins.as_ptr().cast()),
                scale: self.d.to_f32(),
                offset_scale: -self.dmin.to_f32(),
            }
        }

        #[inline(always)]
        unsafe fn group(&self, group: usize) -> __m256i {
            // Bytes 32j..32j + 32 contain group 2j in their low nibbles and group 2j + 1 in their
            // high nibbles.
            let bytes = _mm256_loadu_si256(self.qs.as_ptr().add(32 * (group / 2)).cast());
            let shifted = if group.is_multiple_of(2) { bytes } else { _mm256_srli_epi16(bytes, 4) };
            _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
        }
    }

    impl SuperBlock for Q6K {
        #[inline(always)]
        unsafe fn scales(&self) -> Scales {
            let mut scales = [0i16; 2 * GROUPS];
            for (wide, &scale) in scales.iter_mut().zip(&self.scales) {
                *wide = i16::from(scale);
            }
            let mut groups = [_mm256_setzero_si256(); GROUPS];
            for (group, vector) in groups.iter_mut().enumerate() {
                // Elements 0..16 of a group take its first scale, 16..32 its second.
                *vector = _mm256_set_m128i(
                    _mm_set1_epi16(scales[2 * group + 1]),
                    _mm_set1_epi16(scales[2 * group]),
                );
            }
            let scale = self.d.to_f32();
            Scales {
                groups,
                offsets: _mm256_loadu_si256(scales.as_ptr().cast()),
                scale,
                // Values are stored plus 32.
                offset_scale: -32.0 * scale,
            }
        }

        #[inline(always)]
        unsafe fn group(&self, group: usize) -> __m256i {
            // Group 4h + k of half h: low (k < 2) or high nibbles of `ql[64h + 32(k % 2)..]`,
            // with bits 2k and 2k + 1 of `qh[32h..]` above them.
            let (half, k) = (group / 4, group % 4);
            let low = _mm256_loadu_si256(self.ql.as_ptr().add(64 * half + 32 * (k % 2)).cast());
            let low = if k < 2 { low } else { _mm256_srli_epi16(low, 4) };
            let low = _mm256_and_si256(low, _mm256_set1_epi8(0x0F));
            let high = _mm256_loadu_si256(self.qh.as_ptr().add(32 * half).cast());
            let high = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k as i32)), _mm256_set1_epi8(3));
            _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
        }
    }

    /// Adds the scaled products of one group's unsigned weights and signed activations to the
    /// i32 lanes of `sums`, with AVX2.
    #[inline(always)]
    unsafe fn add_group_avx2(sums: __m256i, weights: __m256i, activations: __m256i, scales: __m256i) -> __m256i {
        _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(weights, activations), scales))
    }

    /// [`add_group_avx2`] with VNNI's `vpdpwssd` for the multiply and add.
    #[inline(always)]
    unsafe fn add_group_vnni(sums: __m256i, weights: __m256i, activations: __m256i, scales: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(sums, _mm256_maddubs_epi16(weights, activations), scales)
    }

    /// Computes one tile: weight rows `row..row + R` by activation rows `col..col + C`.
    ///
    /// # Safety
    /// The CPU has the instructions `add_group` uses, and the rows lie inside the slices as
    /// `shape` describes them.
    // The index loops address the accumulator grids and the loaded blocks together.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<W: SuperBlock, const R: usize, const C: usize, const VNNI: bool>(
        weights: &[W],
        activations: &[Q8K],
        shape: Shape,
        row: usize,
        col: usize,
        out: &mut [f32],
    ) {
        let blocks = shape.blocks;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        // SAFETY (zeroed): all-zero bits are valid for SIMD registers and the f32 fields.
        let mut scales: [Scales; R] = std::mem::zeroed();
        for block in 0..blocks {
            let weight = |r: usize| weights.get_unchecked((row + r) * blocks + block);
            let activation = |c: usize| activations.get_unchecked((col + c) * blocks + block);
            for (r, scales) in scales.iter_mut().enumerate() {
                *scales = weight(r).scales();
            }
            let mut sums = [[_mm256_setzero_si256(); C]; R];
            for group in 0..GROUPS {
                let mut values = [_mm256_setzero_si256(); R];
                for (r, values) in values.iter_mut().enumerate() {
                    *values = weight(r).group(group);
                }
                for c in 0..C {
                    let a = _mm256_loadu_si256(activation(c).qs.as_ptr().add(32 * group).cast());
                    for r in 0..R {
                        sums[r][c] = if VNNI {
                            add_group_vnni(sums[r][c], values[r], a, scales[r].groups[group])
                        } else {
                            add_group_avx2(sums[r][c], values[r], a, scales[r].groups[group])
                        };
                    }
                }
            }
            for c in 0..C {
                let a = activation(c);
                let run_sums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
                for r in 0..R {
                    let s = &scales[r];
                    let products = _mm256_set1_ps(s.scale * a.d);
                    acc[r][c] = _mm256_fmadd_ps(products, _mm256_cvtepi32_ps(sums[r][c]), acc[r][c]);
                    let offsets = _mm256_cvtepi32_ps(_mm256_madd_epi16(run_sums, s.offsets));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(s.offset_scale * a.d), offsets, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                *out.get_unchecked_mut((row + r) * shape.m + col + c) = horizontal_sum(acc[r][c]);
            }
        }
    }

    /// Covers the whole product with tiles of up to `R` weight rows by `C` activation rows,
    /// activation columns outermost so that the weight rows stay in the cache.
    #[inline(always)]
    unsafe fn tiles<W: SuperBlock, const R: usize, const C: usize, const VNNI: bool>(
        weights: &[W],
        activations: &[Q8K],
        shape: Shape,
        out: &mut [f32],
    ) {
        let mut col = 0;
        while col < shape.m {
            let width = C.min(shape.m - col);
            let mut row = 0;
            while row < shape.rows {
                let height = if shape.rows - row >= R { R } else { 1 };
                match (height == R, width == C) {
                    (true, true) => tile::<W, R, C, VNNI>(weights, activations, shape, row, col, out),
                    (false, true) => tile::<W, 1, C, VNNI>(weights, activations, shape, row, col, out),
                    // Edge columns, and a single decode row, go one activation row at a time.
                    (true, false) => {
                        for c in col..col + width {
                            tile::<W, R, 1, VNNI>(weights, activations, shape, row, c, out);
                        }
                    }
                    (false, false) => {
                        for c in col..col + width {
                            tile::<W, 1, 1, VNNI>(weights, activations, shape, row, c, out);
                        }
                    }
                }
                row += height;
            }
            col += width;
        }
    }

    // Each tile entry keeps an i32 and an f32 accumulator, twice the registers of the
    // 32-element kernels, so the tiles are smaller.

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q4k_vnni(weights: &[Q4K], activations: &[Q8K], shape: Shape, out: &mut [f32]) {
        tiles::<Q4K, 2, 4, true>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4k_avx2(weights: &[Q4K], activations: &[Q8K], shape: Shape, out: &mut [f32]) {
        tiles::<Q4K, 2, 2, false>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q6k_vnni(weights: &[Q6K], activations: &[Q8K], shape: Shape, out: &mut [f32]) {
        tiles::<Q6K, 2, 4, true>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q6k_avx2(weights: &[Q6K], activations: &[Q8K], shape: Shape, out: &mut [f32]) {
        tiles::<Q6K, 2, 2, false>(weights, activations, shape, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::tests::check;

    #[test]
    fn dispatched_kernels_match_scalar_reference() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        check("q4k", &|w, a, blocks, m, out| assert!(q4k_rows(w, a, blocks, m, out)));
        check("q6k", &|w, a, blocks, m, out| assert!(q6k_rows(w, a, blocks, m, out)));
    }

    /// Each instruction-set path this CPU has, so that a VNNI machine also tests the AVX2 one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_path_matches_scalar_reference() {
        use crate::kernels::cpu::{has_avx2, has_vnni};
        use crate::kernels::gemm::tests::on_path;

        // SAFETY: each path runs only where its instructions were detected.
        unsafe {
            if has_avx2() {
                check("q4k avx2", &on_path::<Q4K, Q8K>(x86::q4k_avx2));
                check("q6k avx2", &on_path::<Q6K, Q8K>(x86::q6k_avx2));
            }
            if has_vnni() {
                check("q4k vnni", &on_path::<Q4K, Q8K>(x86::q4k_vnni));
                check("q6k vnni", &on_path::<Q6K, Q8K>(x86::q6k_vnni));
            }
        }
    }
}
