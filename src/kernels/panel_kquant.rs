//! Products of K-quant weight rows (Q4_K, Q6_K) with Q8_K activation rows through
//! row-interleaved panels, as `panel` does for Q5_0.
//!
//! A panel super-block holds 256 elements of eight weight rows as unsigned bytes, row `r` in
//! 32-bit lane `r`, and each row's sub-block scales as f32. For each sub-block (32 elements in
//! Q4_K, 16 in Q6_K), `vpdpbusd` gives the exact integer dot product of all eight rows at once,
//! which is converted and multiplied by the rows' sub-block scales. Q4_K's minimums are then
//! subtracted with the activation's sum over each group of 32. Q6_K's offset of 32 is removed
//! in integers, through the accumulator's starting value.
//!
//! As in `panel`, the arithmetic of each output depends neither on the batch nor on the lane.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K};

use super::panel::BlockTerms;

/// Fills `out`, laid out weight-row-major (`m` values per weight row), with the products of the
/// Q4_K weight rows in `weights` (`blocks` super-blocks each) and the `m` activation rows in
/// `activations`, whose `terms` come from [`BlockTerms::q4k`]. Returns `false`, leaving `out`
/// untouched, when this CPU has no panel kernel.
pub fn q4k_rows(
    weights: &[BlockQ4K],
    activations: &[BlockQ8K],
    terms: &BlockTerms,
    blocks: usize,
    m: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::dispatch(weights, activations, terms.sums.len(), terms, blocks, m, out, x86::q4k_vnni, x86::q4k_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// [`q4k_rows`] for Q6_K weights, with `terms` from [`BlockTerms::q6k`].
pub fn q6k_rows(
    weights: &[BlockQ6K],
    activations: &[BlockQ8K],
    terms: &BlockTerms,
    blocks: usize,
    m: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::dispatch(weights, activations, terms.offsets.len() / 2, terms, blocks, m, out, x86::q6k_vnni, x86::q6k_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use crate::kernels::gemm::x86::{prefetch_rows, PREFETCH_MAX_ROWS};
    use crate::kernels::gemm::Shape;
    use crate::kernels::layout::{view, Mirrors, Q4K, Q6K, Q8K};
    use crate::kernels::panel::x86::{transpose, Avx2, QuadDot, Vnni};
    use crate::kernels::panel::{BlockTerms, PANEL_ROWS};
    use half::f16;

    /// Groups of 32 elements in a super-block.
    const GROUPS: usize = 8;

    /// Activation rows handled together over one panel.
    const COLUMNS: usize = 4;

    pub(super) type Kernel<W> = unsafe fn(&[W], &[Q8K], &BlockTerms, Shape, &mut [f32]);

    /// Checks the lengths and runs the VNNI kernel where the CPU has VNNI, else the AVX2 one.
    /// `group_terms` counts the terms given in units of 32 activation bytes (eight per
    /// super-block). Returns `false` where the CPU has neither.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch<W: Mirrors>(
        weights: &[W::Candle],
        activations: &[<Q8K as Mirrors>::Candle],
        group_terms: usize,
        terms: &BlockTerms,
        blocks: usize,
        m: usize,
        out: &mut [f32],
        vnni: Kernel<W>,
        avx2: Kernel<W>,
    ) -> bool {
        use crate::kernels::cpu::{has_avx2, has_vnni};

        let kernel = if has_vnni() {
            vnni
        } else if has_avx2() {
            avx2
        } else {
            return false;
        };
        let shape = Shape::new(weights.len(), activations.len(), blocks, m, out.len());
        assert!(
            group_terms >= m * blocks * GROUPS,
            "{group_terms} activation terms for {m} x {blocks} super-blocks"
        );
        // SAFETY: the kernel's instructions were detected on this CPU; `Shape::new` checked the
        // slice lengths and the assertion above the terms.
        unsafe { kernel(view::<W>(weights), view::<Q8K>(activations), terms, shape, out) };
        true
    }

    /// A K-quant type as the panels read it.
    trait PanelSuperBlock: Sized + 'static {
        /// Whether sub-blocks are 16 elements (four quads) rather than 32.
        const HALF_GROUPS: bool;
        /// A super-block of zeros, which fills the lanes of missing rows.
        const ZERO: Self;

        /// Unpacks one super-block of eight rows into `slot`.
        unsafe fn pack(rows: &[&Self; PANEL_ROWS], slot: &mut PanelBlock);
    }

    /// Returns, of 8 bytes in the low half of `bytes`, each unsigned byte as f32 times `scale`.
    #[inline(always)]
    unsafe fn scaled_bytes(bytes: u64, scale: f32) -> __m256 {
        let ints = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64));
        _mm256_mul_ps(_mm256_cvtepi32_ps(ints), _mm256_set1_ps(scale))
    }

    /// Transposes eight rows of eight f32 values, as [`transpose`] does for integers.
    #[inline(always)]
    unsafe fn transpose_ps(rows: [__m256; PANEL_ROWS]) -> [__m256; PANEL_ROWS] {
        transpose(rows.map(|row| _mm256_castps_si256(row))).map(|column| _mm256_castsi256_ps(column))
    }

    impl PanelSuperBlock for Q4K {
        const HALF_GROUPS: bool = false;
        const ZERO: Self = Q4K { d: f16::ZERO, dmin: f16::ZERO, scales: [0; 12], qs: [0; 128] };

        #[inline(always)]
        unsafe fn pack(rows: &[&Self; PANEL_ROWS], slot: &mut PanelBlock) {
            let mut scales = [_mm256_setzero_ps(); PANEL_ROWS];
            let mut mins = [_mm256_setzero_ps(); PANEL_ROWS];
            for (r, row) in rows.iter().enumerate() {
                // Eight 6-bit scales and eight 6-bit minimums are packed in 12 bytes. The first
                // four of each are the low six bits of bytes 0..8. The last four are the nibbles
                // of bytes 8..12 (scales low, minimums high) below the top two bits of bytes 0..8.
                let word = |i: usize| u32::from_le_bytes([row.scales[4 * i], row.scales[4 * i + 1], row.scales[4 * i + 2], row.scales[4 * i + 3]]);
                let (w0, w1, w2) = (word(0), word(1), word(2));
                let scales_low = w0 & 0x3F3F_3F3F;
                let scales_high = (w2 & 0x0F0F_0F0F) | (((w0 >> 6) & 0x0303_0303) << 4);
                let mins_low = w1 & 0x3F3F_3F3F;
                let mins_high = ((w2 >> 4) & 0x0F0F_0F0F) | (((w1 >> 6) & 0x0303_0303) << 4);
                let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
                scales[r] = scaled_bytes(join(scales_low, scales_high), row.d.to_f32());
                mins[r] = scaled_bytes(join(mins_low, mins_high), row.dmin.to_f32());
            }
            slot.scales[..GROUPS].copy_from_slice(&transpose_ps(scales));
            slot.mins = transpose_ps(mins);
            // Bytes 32p..32p + 32 hold group 2p in their low nibbles and group 2p + 1 in their
            // high nibbles, so one transpose serves two groups.
            let low = _mm256_set1_epi8(0x0F);
            for pair in 0..GROUPS / 2 {
                let packed = rows.map(|row| _mm256_loadu_si256(row.qs.as_ptr().add(32 * pair).cast()));
                for (j, quads) in transpose(packed).into_iter().enumerate() {
                    slot.values[16 * pair + j] = _mm256_and_si256(quads, low);
                    slot.values[16 * pair + 8 + j] = _mm256_and_si256(_mm256_srli_epi16(quads, 4), low);
                }
            }
        }
    }

    impl PanelSuperBlock for Q6K {
        const HALF_GROUPS: bool = true;
        const ZERO: Self = Q6K { ql: [0; 128], qh: [0; 64], scales: [0; 16], d: f16::ZERO };

        #[inline(always)]
        unsafe fn pack(rows: &[&Self; PANEL_ROWS], slot: &mut PanelBlock) {
            let mut first = [_mm256_setzero_ps(); PANEL_ROWS];
            let mut second = [_mm256_setzero_ps(); PANEL_ROWS];
            for (r, row) in rows.iter().enumerate() {
                let d = _mm256_set1_ps(row.d.to_f32());
                let scales = _mm_loadu_si128(row.scales.as_ptr().cast());
                first[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)), d);
                second[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(scales, 8))), d);
            }
            slot.scales[..GROUPS].copy_from_slice(&transpose_ps(first));
            slot.scales[GROUPS..].copy_from_slice(&transpose_ps(second));
            for group in 0..GROUPS {
                let quads = transpose(rows.map(|row| q6k_group(row, group)));
                slot.values[8 * group..8 * group + 8].copy_from_slice(&quads);
            }
        }
    }

    /// Returns the unsigned values (0..=63) of elements `32 * group..32 * group + 32` of `block`.
    #[inline(always)]
    unsafe fn q6k_group(block: &Q6K, group: usize) -> __m256i {
        // Group 4h + k of half h: low (k < 2) or high nibbles of `ql[64h + 32(k % 2)..]`, with
        // bits 2k and 2k + 1 of `qh[32h..]` above them.
        let (half, k) = (group / 4, group % 4);
        let low = _mm256_loadu_si256(block.ql.as_ptr().add(64 * half + 32 * (k % 2)).cast());
        let low = if k < 2 { low } else { _mm256_srli_epi16(low, 4) };
        let low = _mm256_and_si256(low, _mm256_set1_epi8(0x0F));
        let high = _mm256_loadu_si256(block.qh.as_ptr().add(32 * half).cast());
        let high = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * k as i32)), _mm256_set1_epi8(3));
        _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
    }

    /// One super-block of eight weight rows.
    #[derive(Clone, Copy)]
    struct PanelBlock {
        /// Quad `j` of group `g` of every row: bytes `4r..4r + 4` of `values[8g + j]` are
        /// elements `32g + 4j..32g + 4j + 4` of row `r`.
        values: [__m256i; 8 * GROUPS],
        /// Each row's scale of each sub-block (the first eight only where sub-blocks are 32
        /// elements): the super-block scale times the sub-block's.
        scales: [__m256; 2 * GROUPS],
        /// Each row's minimum of each group of 32, scaled (Q4_K only).
        mins: [__m256; GROUPS],
    }

    thread_local! {
        /// The panel being multiplied, reused across calls on this thread.
        static PANEL: RefCell<Vec<PanelBlock>> = const { RefCell::new(Vec::new()) };
    }

    /// Unpacks weight rows `first..first + count` (`count` ≤ 8) into `panel`; missing rows
    /// take zero blocks.
    #[inline(always)]
    unsafe fn pack<W: PanelSuperBlock>(weights: &[W], blocks: usize, first: usize, count: usize, panel: &mut [PanelBlock]) {
        let zero = W::ZERO;
        for (block, slot) in panel.iter_mut().enumerate() {
            let mut rows = [&zero; PANEL_ROWS];
            for (r, row) in rows.iter_mut().enumerate().take(count) {
                *row = weights.get_unchecked((first + r) * blocks + block);
            }
            W::pack(&rows, slot);
        }
    }

    /// Returns the lanes of `start` plus the products of the quads `first..first + count` of
    /// `weights` with the activation quads at `quads`, in two chains.
    #[inline(always)]
    unsafe fn quad_sums<D: QuadDot>(start: __m256i, weights: &[__m256i], quads: *const i32, first: usize, count: usize) -> __m256i {
        let mut even = start;
        let mut odd = _mm256_setzero_si256();
        for j in (first..first + count).step_by(2) {
            even = D::dot(even, weights[j], _mm256_set1_epi32(quads.add(j).read_unaligned()));
            odd = D::dot(odd, weights[j + 1], _mm256_set1_epi32(quads.add(j + 1).read_unaligned()));
        }
        _mm256_add_epi32(even, odd)
    }

    /// Multiplies the panel of weight rows `first..first + count` with activation rows
    /// `col..col + C`.
    // The index loops address the accumulators and the activation rows together.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn columns<W: PanelSuperBlock, D: QuadDot, const C: usize>(
        panel: &[PanelBlock],
        activations: &[Q8K],
        terms: &BlockTerms,
        shape: Shape,
        first: usize,
        count: usize,
        col: usize,
        out: &mut [f32],
    ) {
        let blocks = shape.blocks;
        let mut acc = [_mm256_setzero_ps(); C];
        for (block, weights) in panel.iter().enumerate() {
            // The super-block's sum before the activation scale.
            let mut part = [_mm256_setzero_ps(); C];
            for group in 0..GROUPS {
                let values = &weights.values[8 * group..8 * group + 8];
                for c in 0..C {
                    let index = (col + c) * blocks + block;
                    let quads = activations.get_unchecked(index).qs.as_ptr().add(32 * group).cast::<i32>();
                    if W::HALF_GROUPS {
                        for half in 0..2 {
                            let sub = 2 * group + half;
                            let start = _mm256_set1_epi32(*terms.offsets.get_unchecked(index * 2 * GROUPS + sub));
                            let sums = quad_sums::<D>(start, values, quads, 4 * half, 4);
                            part[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), weights.scales[sub], part[c]);
                        }
                    } else {
                        let sums = quad_sums::<D>(_mm256_setzero_si256(), values, quads, 0, 8);
                        part[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), weights.scales[group], part[c]);
                        let sum = _mm256_set1_ps(*terms.sums.get_unchecked(index * GROUPS + group));
                        part[c] = _mm256_fnmadd_ps(weights.mins[group], sum, part[c]);
                    }
                }
            }
            for c in 0..C {
                let scale = _mm256_set1_ps(activations.get_unchecked((col + c) * blocks + block).d);
                acc[c] = _mm256_fmadd_ps(part[c], scale, acc[c]);
            }
        }
        for c in 0..C {
            let mut lanes = [0f32; PANEL_ROWS];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[c]);
            for (r, &value) in lanes.iter().enumerate().take(count) {
                *out.get_unchecked_mut((first + r) * shape.m + col + c) = value;
            }
        }
    }

    /// Packs each panel of eight weight rows in turn and runs every activation row over it.
    #[inline(always)]
    unsafe fn product<W: PanelSuperBlock, D: QuadDot>(
        weights: &[W],
        activations: &[Q8K],
        terms: &BlockTerms,
        shape: Shape,
        out: &mut [f32],
    ) {
        PANEL.with_borrow_mut(|buffer| {
            if buffer.len() < shape.blocks {
                // SAFETY: all-zero bits are valid for SIMD registers.
                buffer.resize_with(shape.blocks, || unsafe { std::mem::zeroed() });
            }
            let panel = &mut buffer[..shape.blocks];
            for first in (0..shape.rows).step_by(PANEL_ROWS) {
                let count = PANEL_ROWS.min(shape.rows - first);
                if shape.m <= PREFETCH_MAX_ROWS {
                    prefetch_rows(weights, shape.blocks, first + PANEL_ROWS, PANEL_ROWS);
                }
                pack(weights, shape.blocks, first, count, panel);
                let mut col = 0;
                while col < shape.m {
                    let width = COLUMNS.min(shape.m - col);
                    // The match keeps each width's loops unrolled.
                    match width {
                        COLUMNS => columns::<W, D, COLUMNS>(panel, activations, terms, shape, first, count, col, out),
                        3 => columns::<W, D, 3>(panel, activations, terms, shape, first, count, col, out),
                        2 => columns::<W, D, 2>(panel, activations, terms, shape, first, count, col, out),
                        _ => columns::<W, D, 1>(panel, activations, terms, shape, first, count, col, out),
                    }
                    col += width;
                }
            }
        });
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q4k_vnni(weights: &[Q4K], activations: &[Q8K], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Q4K, Vnni>(weights, activations, terms, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4k_avx2(weights: &[Q4K], activations: &[Q8K], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Q4K, Avx2>(weights, activations, terms, shape, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q6k_vnni(weights: &[Q6K], activations: &[Q8K], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Q6K, Vnni>(weights, activations, terms, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q6k_avx2(weights: &[Q6K], activations: &[Q8K], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Q6K, Avx2>(weights, activations, terms, shape, out)
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
        check("q4k panel", &|w, a, blocks, m, out| assert!(q4k_rows(w, a, &BlockTerms::q4k(a), blocks, m, out)));
        check("q6k panel", &|w, a, blocks, m, out| assert!(q6k_rows(w, a, &BlockTerms::q6k(a), blocks, m, out)));
    }

    /// Each instruction-set path this CPU has, so that a VNNI machine also tests the AVX2 one,
    /// and each output's bits whatever the batch and the lane.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_path_matches_reference() {
        use candle_core::quantized::k_quants::GgmlType;

        use crate::kernels::activation::ActivationBlock;
        use crate::kernels::cpu::{has_avx2, has_vnni};
        use crate::kernels::tests::sample;

        // SAFETY: each path runs only where its instructions were detected.
        unsafe {
            if has_avx2() {
                check("q4k panel avx2", &with_terms(BlockTerms::q4k, x86::q4k_avx2));
                check("q6k panel avx2", &with_terms(BlockTerms::q6k, x86::q6k_avx2));
            }
            if has_vnni() {
                check("q4k panel vnni", &with_terms(BlockTerms::q4k, x86::q4k_vnni));
                check("q6k panel vnni", &with_terms(BlockTerms::q6k, x86::q6k_vnni));
            }
        }

        // Bits of each output alone against the whole product: 10 rows (a full panel and part
        // of another), 5 activation rows (a tile and a tail).
        let (rows, m, blocks) = (10, 5, 2);
        let cols = blocks * 256;
        let mut activations = vec![BlockQ8K::zeros(); m * blocks];
        for (row, out) in sample(m * cols, 6).chunks_exact(cols).zip(activations.chunks_exact_mut(blocks)) {
            BlockQ8K::quantize(row, out);
        }
        let mut q4k = vec![BlockQ4K::zeros(); rows * blocks];
        BlockQ4K::from_float(&sample(rows * cols, 7), &mut q4k);
        let mut q6k = vec![BlockQ6K::zeros(); rows * blocks];
        BlockQ6K::from_float(&sample(rows * cols, 8), &mut q6k);
        let products: [(&str, &dyn Fn(usize, usize, usize, &mut [f32]) -> bool); 2] = [
            ("q4k", &|row, count, col, out| {
                let a = &activations[col * blocks..(col + out.len() / count) * blocks];
                q4k_rows(&q4k[row * blocks..(row + count) * blocks], a, &BlockTerms::q4k(a), blocks, out.len() / count, out)
            }),
            ("q6k", &|row, count, col, out| {
                let a = &activations[col * blocks..(col + out.len() / count) * blocks];
                q6k_rows(&q6k[row * blocks..(row + count) * blocks], a, &BlockTerms::q6k(a), blocks, out.len() / count, out)
            }),
        ];
        for (name, product) in products {
            let mut whole = vec![0f32; rows * m];
            assert!(product(0, rows, 0, &mut whole));
            for row in 0..rows {
                for col in 0..m {
                    let mut alone = [0f32];
                    assert!(product(row, 1, col, &mut alone));
                    assert_eq!(alone[0].to_bits(), whole[row * m + col].to_bits(), "{name}, row {row}, column {col}");
                }
            }
        }
    }

    /// Wraps one instruction set's kernel as a checked function that computes its own terms.
    ///
    /// # Safety
    /// The CPU must have the kernel's instructions.
    #[cfg(target_arch = "x86_64")]
    unsafe fn with_terms<W: crate::kernels::layout::Mirrors>(
        terms: fn(&[BlockQ8K]) -> BlockTerms,
        kernel: x86::Kernel<W>,
    ) -> impl Fn(&[W::Candle], &[BlockQ8K], usize, usize, &mut [f32]) {
        use crate::kernels::gemm::Shape;
        use crate::kernels::layout::{view, Q8K};

        move |w, a, blocks, m, out| {
            let shape = Shape::new(w.len(), a.len(), blocks, m, out.len());
            // SAFETY: the caller of `with_terms` checked the CPU features; `Shape::new` checked
            // the lengths.
            unsafe { kernel(view::<W>(w), view::<Q8K>(a), &terms(a), shape, out) }
        }
    }
}
