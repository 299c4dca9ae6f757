//! Products of Q5_0 weight rows with Q8_0 activation rows through row-interleaved panels.
//!
//! The tiles of `gemm` keep one accumulator per pair of weight row and activation row, with
//! eight partial sums in it, and pay a float conversion, a scale product and a multiply-add
//! for every pair and block. Here eight weight rows are first unpacked into a panel: register
//! `j` of a panel block holds elements `4j..4j + 4` of all eight rows, one row per 32-bit lane.
//! One `vpdpbusd` of that register with four activation bytes broadcast to every lane then
//! advances eight outputs, so a block of eight outputs costs eight of those, one conversion
//! and one multiply-add. The unpacking is paid once per eight rows, and the panel stays in the
//! L1 cache while every activation row passes over it.
//!
//! Each output is computed the same way whatever the number of activation rows and whatever
//! the lane of its weight row. The exact integer sum of a block is multiplied by the product of
//! the two block scales and added block by block in order. A prompt split into pieces
//! therefore gets the same bits as the whole prompt, as the prefix cache and label scoring need.

use candle_core::quantized::k_quants::{BlockQ5_0, BlockQ8K, BlockQ8_0};

use super::layout::{view, Q8K, Q8_0};

/// Weight rows in one panel: the 32-bit lanes of a 256-bit register.
pub const PANEL_ROWS: usize = 8;

/// Per-block values of the activations that the panel kernels read besides the bytes, computed
/// once per product.
#[derive(Default)]
pub struct BlockTerms {
    /// Minus the weights' offset times the sum of the bytes it applies to: one per Q8_0 block
    /// (Q5_0), one per 16 elements (Q6_K).
    pub(super) offsets: Vec<i32>,
    /// Q8_0 block scales (Q5_0).
    pub(super) scales: Vec<f32>,
    /// Sums of each 32 bytes of a Q8_K block, as f32 (Q4_K's minimums).
    pub(super) sums: Vec<f32>,
}

impl BlockTerms {
    /// Computes the terms of Q8_0 activation blocks against Q5_0 weights, which the panels
    /// store plus 16.
    pub fn q5_0(activations: &[BlockQ8_0]) -> Self {
        let blocks = view::<Q8_0>(activations);
        Self {
            offsets: blocks.iter().map(|b| -16 * b.qs.iter().map(|&q| i32::from(q)).sum::<i32>()).collect(),
            scales: blocks.iter().map(|b| b.d.to_f32()).collect(),
            sums: Vec::new(),
        }
    }

    /// Computes the terms of Q8_K activation blocks against Q4_K weights: each 32-byte sum.
    pub fn q4k(activations: &[BlockQ8K]) -> Self {
        let sums = view::<Q8K>(activations)
            .iter()
            .flat_map(|b| b.bsums.chunks_exact(2).map(|pair| f32::from(pair[0]) + f32::from(pair[1])))
            .collect();
        Self { sums, ..Self::default() }
    }

    /// Computes the terms of Q8_K activation blocks against Q6_K weights, which are stored plus
    /// 32: minus 32 times each 16-byte sum.
    pub fn q6k(activations: &[BlockQ8K]) -> Self {
        let offsets =
            view::<Q8K>(activations).iter().flat_map(|b| b.bsums.iter().map(|&sum| -32 * i32::from(sum))).collect();
        Self { offsets, ..Self::default() }
    }
}

/// Fills `out`, laid out weight-row-major (`m` values per weight row), with the products of the
/// weight rows in `weights` (`blocks` blocks each) and the `m` activation rows in
/// `activations`, whose `terms` come from [`BlockTerms::q5_0`]. Returns `false`, leaving `out`
/// untouched, when this CPU has no panel kernel.
pub fn q5_0_rows(
    weights: &[BlockQ5_0],
    activations: &[BlockQ8_0],
    terms: &BlockTerms,
    blocks: usize,
    m: usize,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::cpu::{has_avx2, has_vnni};
        use super::gemm::Shape;
        use super::layout::Q5_0;

        let kernel: x86::Kernel = if has_vnni() {
            x86::q5_0_vnni
        } else if has_avx2() {
            x86::q5_0_avx2
        } else {
            return false;
        };
        let shape = Shape::new(weights.len(), activations.len(), blocks, m, out.len());
        assert!(
            terms.offsets.len() >= m * blocks && terms.scales.len() >= m * blocks,
            "{} activation block terms for {m} x {blocks} blocks",
            terms.offsets.len().min(terms.scales.len())
        );
        // SAFETY: the kernel's instructions were detected on this CPU; `Shape::new` checked the
        // slice lengths and the assertion above the terms.
        unsafe { kernel(view::<Q5_0>(weights), view::<Q8_0>(activations), terms, shape, out) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (weights, activations, terms, blocks, m, out);
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::{BlockTerms, PANEL_ROWS};
    use crate::kernels::gemm::x86::{dot_u8_i8, prefetch_rows, q5_0_unsigned, PREFETCH_MAX_ROWS};
    use crate::kernels::gemm::Shape;
    use crate::kernels::layout::{Q5_0, Q8_0};

    pub(super) type Kernel = unsafe fn(&[Q5_0], &[Q8_0], &BlockTerms, Shape, &mut [f32]);

    /// Activation rows handled together over one panel: each panel block is loaded once for
    /// all of them.
    const COLUMNS: usize = 4;

    /// One block of eight weight rows: `values[j]` holds elements `4j..4j + 4` of row `r` in
    /// bytes `4r..4r + 4`, plus 16; `scales` holds each row's block scale.
    #[derive(Clone, Copy)]
    struct PanelBlock {
        values: [__m256i; 8],
        scales: __m256,
    }

    thread_local! {
        /// The panel being multiplied, reused across calls on this thread.
        static PANEL: RefCell<Vec<PanelBlock>> = const { RefCell::new(Vec::new()) };
    }

    /// The product of four bytes of each lane of `weights` (unsigned) and of `activations`
    /// (signed), added to the lanes of `acc`.
    pub(in crate::kernels) trait QuadDot {
        unsafe fn dot(acc: __m256i, weights: __m256i, activations: __m256i) -> __m256i;
    }

    pub(in crate::kernels) struct Vnni;

    impl QuadDot for Vnni {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, weights: __m256i, activations: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, weights, activations)
        }
    }

    /// AVX2's `vpmaddubsw` pairs cannot saturate here, because 2 × 31 × 127 fits an i16.
    // NOTE: the AVX2 paths are tested for their values, but their speed was measured on no
    // AVX2-only CPU, where 16 registers may not hold a panel block and four accumulators.
    pub(in crate::kernels) struct Avx2;

    impl QuadDot for Avx2 {
        #[inline(always)]
        unsafe fn dot(acc: __m256i, weights: __m256i, activations: __m256i) -> __m256i {
            _mm256_add_epi32(acc, dot_u8_i8(weights, activations))
        }
    }

    /// Transposes eight rows of eight 32-bit values: lane `r` of output `j` is lane `j` of
    /// input `r`.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn transpose(rows: [__m256i; 8]) -> [__m256i; 8] {
        // Pairs of rows, then quads (each 128-bit half still separate), then the halves.
        let (t0, t1) = (_mm256_unpacklo_epi32(rows[0], rows[1]), _mm256_unpackhi_epi32(rows[0], rows[1]));
        let (t2, t3) = (_mm256_unpacklo_epi32(rows[2], rows[3]), _mm256_unpackhi_epi32(rows[2], rows[3]));
        let (t4, t5) = (_mm256_unpacklo_epi32(rows[4], rows[5]), _mm256_unpackhi_epi32(rows[4], rows[5]));
        let (t6, t7) = (_mm256_unpacklo_epi32(rows[6], rows[7]), _mm256_unpackhi_epi32(rows[6], rows[7]));
        let (q0, q1) = (_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2));
        let (q2, q3) = (_mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3));
        let (q4, q5) = (_mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6));
        let (q6, q7) = (_mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7));
        [
            _mm256_permute2x128_si256(q0, q4, 0x20),
            _mm256_permute2x128_si256(q1, q5, 0x20),
            _mm256_permute2x128_si256(q2, q6, 0x20),
            _mm256_permute2x128_si256(q3, q7, 0x20),
            _mm256_permute2x128_si256(q0, q4, 0x31),
            _mm256_permute2x128_si256(q1, q5, 0x31),
            _mm256_permute2x128_si256(q2, q6, 0x31),
            _mm256_permute2x128_si256(q3, q7, 0x31),
        ]
    }

    /// Unpacks weight rows `first..first + count` (`count` ≤ 8) into `panel`; missing rows
    /// get zero values and scales.
    #[inline(always)]
    unsafe fn pack(weights: &[Q5_0], blocks: usize, first: usize, count: usize, panel: &mut [PanelBlock]) {
        for (block, slot) in panel.iter_mut().enumerate() {
            let mut rows = [_mm256_setzero_si256(); PANEL_ROWS];
            let mut scales = [0f32; PANEL_ROWS];
            for r in 0..count {
                let weight = weights.get_unchecked((first + r) * blocks + block);
                rows[r] = q5_0_unsigned(weight);
                scales[r] = weight.d.to_f32();
            }
            slot.values = transpose(rows);
            slot.scales = _mm256_loadu_ps(scales.as_ptr());
        }
    }

    /// Multiplies the panel of weight rows `first..first + count` with activation rows
    /// `col..col + C`.
    // The index loops address the accumulators and the activation rows together.
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn columns<D: QuadDot, const C: usize>(
        panel: &[PanelBlock],
        activations: &[Q8_0],
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
            for c in 0..C {
                let index = (col + c) * blocks + block;
                let quads = activations.get_unchecked(index).qs.as_ptr().cast::<i32>();
                // Two chains halve the latency of the eight dependent multiply-adds.
                let mut even = _mm256_set1_epi32(*terms.offsets.get_unchecked(index));
                let mut odd = _mm256_setzero_si256();
                for j in (0..8).step_by(2) {
                    even = D::dot(even, weights.values[j], _mm256_set1_epi32(quads.add(j).read_unaligned()));
                    odd = D::dot(odd, weights.values[j + 1], _mm256_set1_epi32(quads.add(j + 1).read_unaligned()));
                }
                let sums = _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd));
                let scales = _mm256_mul_ps(weights.scales, _mm256_set1_ps(*terms.scales.get_unchecked(index)));
                acc[c] = _mm256_fmadd_ps(sums, scales, acc[c]);
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
    unsafe fn product<D: QuadDot>(weights: &[Q5_0], activations: &[Q8_0], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
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
                        COLUMNS => columns::<D, COLUMNS>(panel, activations, terms, shape, first, count, col, out),
                        3 => columns::<D, 3>(panel, activations, terms, shape, first, count, col, out),
                        2 => columns::<D, 2>(panel, activations, terms, shape, first, count, col, out),
                        _ => columns::<D, 1>(panel, activations, terms, shape, first, count, col, out),
                    }
                    col += width;
                }
            }
        });
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q5_0_vnni(weights: &[Q5_0], activations: &[Q8_0], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Vnni>(weights, activations, terms, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q5_0_avx2(weights: &[Q5_0], activations: &[Q8_0], terms: &BlockTerms, shape: Shape, out: &mut [f32]) {
        product::<Avx2>(weights, activations, terms, shape, out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::GgmlType;

    use super::*;
    use crate::kernels::activation::ActivationBlock;
    use crate::kernels::gemm::tests::check;
    use crate::kernels::tests::sample;

    #[test]
    fn dispatched_kernel_matches_scalar_reference() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        check("q5_0 panel", &|w, a, blocks, m, out| assert!(q5_0_rows(w, a, &BlockTerms::q5_0(a), blocks, m, out)));
    }

    /// Runs `kernel` on `rows` weight rows of `blocks` blocks and all of `activations`, and
    /// returns the weight-row-major output.
    #[cfg(target_arch = "x86_64")]
    fn run(kernel: x86::Kernel, weights: &[BlockQ5_0], activations: &[BlockQ8_0], rows: usize, blocks: usize) -> Vec<f32> {
        use crate::kernels::gemm::Shape;
        use crate::kernels::layout::Q5_0;

        let m = activations.len() / blocks;
        let mut out = vec![f32::NAN; rows * m];
        let shape = Shape::new(weights.len(), activations.len(), blocks, m, out.len());
        let terms = BlockTerms::q5_0(activations);
        // SAFETY: the callers check the CPU features; `Shape::new` checked the lengths.
        unsafe { kernel(view::<Q5_0>(weights), view::<Q8_0>(activations), &terms, shape, &mut out) };
        out
    }

    /// Every path gives the same bits, and each output's bits depend neither on how many
    /// activation rows run together nor on which lane of a panel its weight row takes. 13
    /// weight rows fill one panel and part of another; 9 activation rows leave a short tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn output_bits_independent_of_batch() {
        use crate::kernels::cpu::{has_avx2, has_vnni};

        let (rows, m, blocks) = (13, 9, 6);
        let cols = blocks * 32;
        let mut weights = vec![BlockQ5_0::zeros(); rows * blocks];
        BlockQ5_0::from_float(&sample(rows * cols, 3), &mut weights);
        let mut activations = vec![BlockQ8_0::zeros(); m * blocks];
        for (row, out) in sample(m * cols, 4).chunks_exact(cols).zip(activations.chunks_exact_mut(blocks)) {
            BlockQ8_0::quantize(row, out);
        }
        let mut kernels: Vec<(&str, x86::Kernel)> = Vec::new();
        if has_avx2() {
            kernels.push(("avx2", x86::q5_0_avx2));
        }
        if has_vnni() {
            kernels.push(("vnni", x86::q5_0_vnni));
        }
        let Some(&(_, first)) = kernels.first() else { return };
        let whole = run(first, &weights, &activations, rows, blocks);
        for &(name, kernel) in &kernels {
            assert_eq!(run(kernel, &weights, &activations, rows, blocks), whole, "{name}, whole product");
            for row in 0..rows {
                for col in 0..m {
                    let alone = run(
                        kernel,
                        &weights[row * blocks..(row + 1) * blocks],
                        &activations[col * blocks..(col + 1) * blocks],
                        1,
                        blocks,
                    );
                    assert_eq!(alone[0].to_bits(), whole[row * m + col].to_bits(), "{name}, row {row}, column {col}");
                }
            }
        }
    }
}
