//! Tiled products of weight rows with many activation rows at once, for prompt processing.
//!
//! Dotting each weight row with each prompt row separately unpacks every weight block once per
//! prompt row and sums every result across its SIMD lanes once per block. Here a tile of `R`
//! weight rows by `C` activation rows keeps `R × C` accumulators in registers. Each weight
//! block is unpacked once for `C` activation rows and each activation block is loaded once for
//! `R` weight rows. The lanes are summed once per output.
//!
//! Covered are Q8_0 weights against Q8_0 activations and Q4_1 against Q8_1. Q5_0 goes through
//! the panels of `panel`, which unpack its blocks with this module's `q5_0_unsigned`. The VNNI versions multiply unsigned weight bytes with
//! `vpdpbusd` and remove the unsigned offset through the accumulator's starting value; the AVX2
//! versions use `vpmaddubsw`. Both give the same sums as the row-by-row kernels in `dot`, up to
//! the order of the float additions.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_0, BlockQ8_1};

#[cfg(target_arch = "x86_64")]
use super::layout::{view, Mirrors, Q4_1, Q8_0, Q8_1};

/// Minimum number of activation rows for the tiled kernels. A single decode row goes through
/// them too: tiles of four weight rows by one activation row are as fast as the row-by-row dot
/// products or faster (qwen2.5-coder decode +8 %, see BENCHMARKS.md).
pub const MIN_ROWS: usize = 1;

/// Fills `out`, laid out weight-row-major (`m` values per weight row), with the products of the
/// Q8_0 weight rows in `weights` (`blocks` blocks each) and the `m` activation rows in
/// `activations`. Returns `false`, leaving `out` untouched, when this CPU has no tiled kernel.
pub fn q8_0_rows(weights: &[BlockQ8_0], activations: &[BlockQ8_0], blocks: usize, m: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return dispatch::<Q8_0, Q8_0>(weights, activations, blocks, m, out, x86::q8_0_vnni, x86::q8_0_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// [`q8_0_rows`] for Q4_1 weights and Q8_1 activations.
pub fn q4_1_rows(weights: &[BlockQ4_1], activations: &[BlockQ8_1], blocks: usize, m: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return dispatch::<Q4_1, Q8_1>(weights, activations, blocks, m, out, x86::q4_1_vnni, x86::q4_1_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// A tiled kernel for one instruction set.
#[cfg(target_arch = "x86_64")]
pub(super) type Kernel<W, A> = unsafe fn(&[W], &[A], Shape, &mut [f32]);

/// Checks the slice lengths and runs the VNNI kernel where the CPU has VNNI, else the AVX2
/// kernel where it has AVX2. Returns `false` where it has neither.
#[cfg(target_arch = "x86_64")]
pub(super) fn dispatch<W: Mirrors, A: Mirrors>(
    weights: &[W::Candle],
    activations: &[A::Candle],
    blocks: usize,
    m: usize,
    out: &mut [f32],
    vnni: Kernel<W, A>,
    avx2: Kernel<W, A>,
) -> bool {
    let kernel = if super::cpu::has_vnni() {
        vnni
    } else if super::cpu::has_avx2() {
        avx2
    } else {
        return false;
    };
    let shape = Shape::new(weights.len(), activations.len(), blocks, m, out.len());
    // SAFETY: the kernel's instructions were detected on this CPU, and `Shape::new` checked
    // the slice lengths.
    unsafe { kernel(view::<W>(weights), view::<A>(activations), shape, out) };
    true
}

/// The sizes of one tiled product, checked against its slices.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Shape {
    /// Weight rows.
    pub(super) rows: usize,
    /// Activation rows.
    pub(super) m: usize,
    /// Blocks per row, the same for weights and activations.
    pub(super) blocks: usize,
}

#[cfg(target_arch = "x86_64")]
impl Shape {
    pub(super) fn new(weight_blocks: usize, activation_blocks: usize, blocks: usize, m: usize, out: usize) -> Self {
        let rows = out.checked_div(m).unwrap_or(0);
        assert!(
            blocks > 0 && rows * m == out && weight_blocks >= rows * blocks && activation_blocks >= m * blocks,
            "tiled product of {rows} x {blocks} weight blocks by {m} x {blocks} activation blocks \
             given {weight_blocks} and {activation_blocks} blocks and {out} outputs"
        );
        Self { rows, m, blocks }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::Shape;
    use crate::kernels::layout::{Q4_1, Q5_0, Q8_0, Q8_1};

    /// One weight type's part of a tiled product on one instruction set: how a weight block
    /// and an activation block are loaded, and how their product is added to an accumulator.
    trait TileKernel {
        type Weight;
        type Activation;
        /// A weight block as held in registers for the whole tile row.
        type LoadedWeight: Copy;
        /// An activation block as held in registers for the whole tile column.
        type LoadedActivation: Copy;

        unsafe fn load_weight(block: &Self::Weight) -> Self::LoadedWeight;
        unsafe fn load_activation(block: &Self::Activation) -> Self::LoadedActivation;
        /// Returns `acc` plus the product of the two blocks, spread over the eight lanes.
        unsafe fn accumulate(acc: __m256, w: Self::LoadedWeight, a: Self::LoadedActivation) -> __m256;
    }

    #[inline(always)]
    pub(in crate::kernels) unsafe fn horizontal_sum(v: __m256) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
        _mm_cvtss_f32(sum)
    }

    /// Unpacks 16 bytes of nibbles into 32 bytes: low nibbles, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        let packed = _mm_loadu_si128(qs.as_ptr().cast());
        let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        _mm256_set_m128i(high, low)
    }

    /// Returns 0x10 in byte `i` where bit `i` of `bits` is set, 0 elsewhere.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Returns a Q5_0 block's values plus 16, so that they fit unsigned bytes (0..=31).
    #[inline(always)]
    pub(in crate::kernels) unsafe fn q5_0_unsigned(block: &Q5_0) -> __m256i {
        _mm256_or_si256(nibbles(&block.qs), fifth_bits(u32::from_le_bytes(block.qh)))
    }

    /// Sums unsigned bytes times signed bytes in groups of four, into eight i32 lanes, with
    /// AVX2. Exact while each pair of products fits an i16, which is true for weights up to 127.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn dot_u8_i8(unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
    }

    /// A Q8_0 activation block: its bytes, scale, and the lane sums of its bytes times the
    /// unsigned offset of the weight type.
    #[derive(Clone, Copy)]
    struct Activation {
        values: __m256i,
        scale: __m256,
        offset: __m256i,
    }

    #[derive(Clone, Copy)]
    struct Weight {
        values: __m256i,
        scale: __m256,
    }

    struct Q8_0Vnni;

    impl TileKernel for Q8_0Vnni {
        type Weight = Q8_0;
        type Activation = Q8_0;
        type LoadedWeight = Weight;
        type LoadedActivation = Activation;

        #[inline(always)]
        unsafe fn load_weight(block: &Q8_0) -> Weight {
            // Flipping the sign bit adds 128: -128..=127 becomes 0..=255.
            let values = _mm256_xor_si256(_mm256_loadu_si256(block.qs.as_ptr().cast()), _mm256_set1_epi8(-128));
            Weight { values, scale: _mm256_set1_ps(block.d.to_f32()) }
        }

        #[inline(always)]
        unsafe fn load_activation(block: &Q8_0) -> Activation {
            let values = _mm256_loadu_si256(block.qs.as_ptr().cast());
            let offset = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), values);
            Activation {
                values,
                scale: _mm256_set1_ps(block.d.to_f32()),
                offset: _mm256_sub_epi32(_mm256_setzero_si256(), offset),
            }
        }

        #[inline(always)]
        unsafe fn accumulate(acc: __m256, w: Weight, a: Activation) -> __m256 {
            let sums = _mm256_dpbusd_epi32(a.offset, w.values, a.values);
            _mm256_fmadd_ps(_mm256_mul_ps(w.scale, a.scale), _mm256_cvtepi32_ps(sums), acc)
        }
    }

    /// Q8_0 weights on AVX2 keep their sign: `vpmaddubsw` would saturate on 255 × 127 + 255 × 127,
    /// so the weight's sign moves onto the activation instead.
    struct Q8_0Avx2;

    #[derive(Clone, Copy)]
    struct SignedWeight {
        values: __m256i,
        magnitudes: __m256i,
        scale: __m256,
    }

    impl TileKernel for Q8_0Avx2 {
        type Weight = Q8_0;
        type Activation = Q8_0;
        type LoadedWeight = SignedWeight;
        type LoadedActivation = Weight;

        #[inline(always)]
        unsafe fn load_weight(block: &Q8_0) -> SignedWeight {
            let values = _mm256_loadu_si256(block.qs.as_ptr().cast());
            SignedWeight {
                values,
                magnitudes: _mm256_sign_epi8(values, values),
                scale: _mm256_set1_ps(block.d.to_f32()),
            }
        }

        #[inline(always)]
        unsafe fn load_activation(block: &Q8_0) -> Weight {
            Weight { values: _mm256_loadu_si256(block.qs.as_ptr().cast()), scale: _mm256_set1_ps(block.d.to_f32()) }
        }

        #[inline(always)]
        unsafe fn accumulate(acc: __m256, w: SignedWeight, a: Weight) -> __m256 {
            let sums = dot_u8_i8(w.magnitudes, _mm256_sign_epi8(a.values, w.values));
            _mm256_fmadd_ps(_mm256_mul_ps(w.scale, a.scale), _mm256_cvtepi32_ps(sums), acc)
        }
    }

    /// A Q4_1 weight block: its nibbles (0..=15), scale and minimum.
    #[derive(Clone, Copy)]
    struct OffsetWeight {
        values: __m256i,
        scale: __m256,
        min: __m256,
    }

    /// A Q8_1 activation block: its bytes, scale, and its scaled sum in the first lane only, so
    /// that one multiply-add per tile entry adds the weight's minimum times the sum.
    #[derive(Clone, Copy)]
    struct SummedActivation {
        values: __m256i,
        scale: __m256,
        sum: __m256,
    }

    /// Q4_1 weights against Q8_1 activations, with `vpdpbusd` where `VNNI` is set and AVX2's
    /// `vpmaddubsw` otherwise.
    struct Q4_1Tile<const VNNI: bool>;

    impl<const VNNI: bool> TileKernel for Q4_1Tile<VNNI> {
        type Weight = Q4_1;
        type Activation = Q8_1;
        type LoadedWeight = OffsetWeight;
        type LoadedActivation = SummedActivation;

        #[inline(always)]
        unsafe fn load_weight(block: &Q4_1) -> OffsetWeight {
            OffsetWeight {
                values: nibbles(&block.qs),
                scale: _mm256_set1_ps(block.d.to_f32()),
                min: _mm256_set1_ps(block.m.to_f32()),
            }
        }

        #[inline(always)]
        unsafe fn load_activation(block: &Q8_1) -> SummedActivation {
            SummedActivation {
                values: _mm256_loadu_si256(block.qs.as_ptr().cast()),
                scale: _mm256_set1_ps(block.d.to_f32()),
                sum: _mm256_castps128_ps256(_mm_set_ss(block.s.to_f32())),
            }
        }

        #[inline(always)]
        unsafe fn accumulate(acc: __m256, w: OffsetWeight, a: SummedActivation) -> __m256 {
            let sums = if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), w.values, a.values)
            } else {
                dot_u8_i8(w.values, a.values)
            };
            let acc = _mm256_fmadd_ps(_mm256_mul_ps(w.scale, a.scale), _mm256_cvtepi32_ps(sums), acc);
            _mm256_fmadd_ps(w.min, a.sum, acc)
        }
    }

    /// Computes one tile: weight rows `row..row + R` by activation rows `col..col + C`.
    ///
    /// # Safety
    /// The CPU has the instructions `K` uses, and the rows lie inside the slices as `Shape`
    /// describes them.
    // The index loops address the accumulator grid and the loaded blocks together.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<K: TileKernel, const R: usize, const C: usize>(
        weights: &[K::Weight],
        activations: &[K::Activation],
        shape: Shape,
        row: usize,
        col: usize,
        out: &mut [f32],
    ) {
        let blocks = shape.blocks;
        // SAFETY (zeroed): all-zero bits are valid for SIMD registers and for structs of them.
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut loaded: [K::LoadedWeight; R] = std::mem::zeroed();
        for block in 0..blocks {
            for r in 0..R {
                loaded[r] = K::load_weight(weights.get_unchecked((row + r) * blocks + block));
            }
            for c in 0..C {
                let activation = K::load_activation(activations.get_unchecked((col + c) * blocks + block));
                for r in 0..R {
                    acc[r][c] = K::accumulate(acc[r][c], loaded[r], activation);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                *out.get_unchecked_mut((row + r) * shape.m + col + c) = horizontal_sum(acc[r][c]);
            }
        }
    }

    /// Largest number of activation rows for which the weights of later tiles are prefetched. A
    /// decode step reads each weight once, from memory, and one core's own cache misses do not
    /// keep enough reads in flight to reach the memory bandwidth.
    pub(in crate::kernels) const PREFETCH_MAX_ROWS: usize = 4;

    /// Tiles ahead whose weights are prefetched.
    const PREFETCH_TILES: usize = 2;

    /// Asks the CPU to load weight rows `first..first + count` into the cache. The rows may lie
    /// past the end of `weights`: prefetches do not fault, and the pointer is never read.
    #[inline(always)]
    pub(in crate::kernels) unsafe fn prefetch_rows<W>(weights: &[W], blocks: usize, first: usize, count: usize) {
        let start = weights.as_ptr().wrapping_add(first * blocks).cast::<i8>();
        let bytes = count * blocks * std::mem::size_of::<W>();
        for offset in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset));
        }
    }

    /// Covers the whole product with tiles of up to `R` weight rows by `C` activation rows,
    /// activation columns outermost so that the weight rows stay in the L1 cache.
    #[inline(always)]
    unsafe fn tiles<K: TileKernel, const R: usize, const C: usize>(
        weights: &[K::Weight],
        activations: &[K::Activation],
        shape: Shape,
        out: &mut [f32],
    ) {
        let mut col = 0;
        while col < shape.m {
            let width = C.min(shape.m - col);
            let mut row = 0;
            while row < shape.rows {
                let height = if shape.rows - row >= R { R } else { 1 };
                if shape.m <= PREFETCH_MAX_ROWS {
                    prefetch_rows(weights, shape.blocks, row + PREFETCH_TILES * R, R);
                }
                // Edge tiles take the smaller shapes; the match keeps each shape's loops unrolled.
                match (height == R, width) {
                    (true, w) if w == C => tile::<K, R, C>(weights, activations, shape, row, col, out),
                    (true, 3) => tile::<K, R, 3>(weights, activations, shape, row, col, out),
                    (true, 2) => tile::<K, R, 2>(weights, activations, shape, row, col, out),
                    (true, _) => tile::<K, R, 1>(weights, activations, shape, row, col, out),
                    (false, w) if w == C => tile::<K, 1, C>(weights, activations, shape, row, col, out),
                    (false, 3) => tile::<K, 1, 3>(weights, activations, shape, row, col, out),
                    (false, 2) => tile::<K, 1, 2>(weights, activations, shape, row, col, out),
                    (false, _) => tile::<K, 1, 1>(weights, activations, shape, row, col, out),
                }
                row += height;
            }
            col += width;
        }
    }

    // Tile shapes: VNNI's AVX-512 gives 32 vector registers, room for 4 × 4 accumulators plus
    // the loaded blocks; AVX2's 16 registers hold 2 × 4.

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q8_0_vnni(weights: &[Q8_0], activations: &[Q8_0], shape: Shape, out: &mut [f32]) {
        tiles::<Q8_0Vnni, 4, 4>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_0_avx2(weights: &[Q8_0], activations: &[Q8_0], shape: Shape, out: &mut [f32]) {
        tiles::<Q8_0Avx2, 2, 4>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vnni,avx512vl")]
    pub(super) unsafe fn q4_1_vnni(weights: &[Q4_1], activations: &[Q8_1], shape: Shape, out: &mut [f32]) {
        tiles::<Q4_1Tile<true>, 4, 4>(weights, activations, shape, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_1_avx2(weights: &[Q4_1], activations: &[Q8_1], shape: Shape, out: &mut [f32]) {
        tiles::<Q4_1Tile<false>, 2, 4>(weights, activations, shape, out)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::quantized::k_quants::GgmlType;

    use super::*;
    use crate::kernels::activation::ActivationBlock;
    use crate::kernels::tests::sample;

    /// A tiled kernel under test: fills `out` from weights and activations quantized from f32.
    pub(in crate::kernels) type Tiled<'a, W, A> = &'a dyn Fn(&[W], &[A], usize, usize, &mut [f32]);

    /// Wraps one instruction set's kernel as a [`Tiled`] function on candle's block types.
    ///
    /// # Safety
    /// The CPU must have the kernel's instructions.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::type_complexity)]
    pub(in crate::kernels) unsafe fn on_path<W: Mirrors, A: Mirrors>(
        kernel: Kernel<W, A>,
    ) -> impl Fn(&[W::Candle], &[A::Candle], usize, usize, &mut [f32]) {
        move |w, a, blocks, m, out| {
            let shape = Shape::new(w.len(), a.len(), blocks, m, out.len());
            // SAFETY: the caller of `on_path` checked the CPU features; `Shape::new` checked
            // the lengths.
            unsafe { kernel(view::<W>(w), view::<A>(a), shape, out) }
        }
    }

    /// Checks `kernel` against candle's scalar dot product of every weight row with every
    /// activation row. 11 weight rows and 7 activation rows leave edge tiles of every shape.
    pub(in crate::kernels) fn check<W, A>(name: &str, kernel: Tiled<W, A>)
    where
        W: GgmlType<VecDotType = A>,
        A: ActivationBlock,
    {
        let (rows, m, blocks) = (11, 7, 5);
        let cols = blocks * W::BLCK_SIZE;
        let mut weights = vec![W::zeros(); rows * blocks];
        W::from_float(&sample(rows * cols, 1), &mut weights);
        let mut activations = vec![A::zeros(); m * blocks];
        for (row, out) in sample(m * cols, 2).chunks_exact(cols).zip(activations.chunks_exact_mut(blocks)) {
            A::quantize(row, out);
        }
        let mut out = vec![f32::NAN; rows * m];
        kernel(&weights, &activations, blocks, m, &mut out);
        for row in 0..rows {
            for col in 0..m {
                let expected = W::vec_dot_unopt(
                    cols,
                    &weights[row * blocks..(row + 1) * blocks],
                    &activations[col * blocks..(col + 1) * blocks],
                );
                let got = out[row * m + col];
                assert!(
                    (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                    "{name}: row {row}, activation row {col}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn dispatched_kernels_match_scalar_reference() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        check("q8_0", &|w, a, blocks, m, out| assert!(q8_0_rows(w, a, blocks, m, out)));
        check("q4_1", &|w, a, blocks, m, out| assert!(q4_1_rows(w, a, blocks, m, out)));
    }

    /// Each instruction-set path this CPU has, so that a VNNI machine also tests the AVX2 one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_path_matches_scalar_reference() {
        use crate::kernels::cpu::{has_avx2, has_vnni};

        // SAFETY: each path runs only where its instructions were detected.
        unsafe {
            if has_avx2() {
                check("q8_0 avx2", &on_path::<Q8_0, Q8_0>(x86::q8_0_avx2));
                check("q4_1 avx2", &on_path::<Q4_1, Q8_1>(x86::q4_1_avx2));
            }
            if has_vnni() {
                check("q8_0 vnni", &on_path::<Q8_0, Q8_0>(x86::q8_0_vnni));
                check("q4_1 vnni", &on_path::<Q4_1, Q8_1>(x86::q4_1_vnni));
            }
        }
    }
}
