//! GGUF weight matrices and their product with f32 activations.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::activation::ActivationBlock;
use super::panel::BlockTerms;
use super::{gemm, panel, panel_kquant, spin_pool};

/// Weight rows handed to one parallel task.
const ROWS_PER_TASK: usize = 16;

/// Minimum number of activation rows quantized in parallel.
const PARALLEL_QUANTIZE_ROWS: usize = 16;

/// The blocks of a weight matrix `(rows, cols)`, stored row-major as in the GGUF file.
pub enum Blocks {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q2K(Vec<BlockQ2K>),
    Q3K(Vec<BlockQ3K>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
    /// f32 or f16 weights, kept as a dense `(rows, cols)` f32 tensor.
    Dense(Tensor),
}

/// A weight matrix of `rows` outputs by `cols` inputs.
pub struct QWeight {
    blocks: Blocks,
    rows: usize,
    cols: usize,
}

/// Applies `$body` with `$blocks` bound to the typed block vector of every quantized variant.
macro_rules! with_blocks {
    ($weight:expr, $blocks:ident => $body:expr, $dense:ident => $dense_body:expr) => {
        match &$weight.blocks {
            Blocks::Q4_0($blocks) => $body,
            Blocks::Q4_1($blocks) => $body,
            Blocks::Q5_0($blocks) => $body,
            Blocks::Q5_1($blocks) => $body,
            Blocks::Q8_0($blocks) => $body,
            Blocks::Q2K($blocks) => $body,
            Blocks::Q3K($blocks) => $body,
            Blocks::Q4K($blocks) => $body,
            Blocks::Q5K($blocks) => $body,
            Blocks::Q6K($blocks) => $body,
            Blocks::Dense($dense) => $dense_body,
        }
    };
}

impl QWeight {
    pub fn new(blocks: Blocks, rows: usize, cols: usize) -> Self {
        Self { blocks, rows, cols }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> Option<GgmlDType> {
        with_blocks!(self, blocks => Some(block_dtype(blocks)), _dense => None)
    }

    /// Computes `x · Wᵀ` for `x` of shape `(m, cols)`; returns `(m, rows)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!("matmul input has {k} columns, the weight expects {}", self.cols);
        }
        with_blocks!(
            self,
            blocks => {
                let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let output = matmul(blocks, self.rows, self.cols, &input, m);
                Tensor::from_vec(output, (m, self.rows), &Device::Cpu)
            },
            dense => x.matmul(&dense.t()?)
        )
    }

    /// Computes `x · Wᵀ` for each of `weights`, which share their input width, in one parallel
    /// dispatch. The values equal those of [`QWeight::forward`] for each weight. Decode runs
    /// the attention projections and the feed-forward gate and up together this way, because
    /// waking the threads for each small product costs as much as the product itself.
    pub fn forward_many(weights: &[&QWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let (m, k) = x.dims2()?;
        if let Some(weight) = weights.iter().find(|w| w.cols != k) {
            candle_core::bail!("matmul input has {k} columns, the weight expects {}", weight.cols);
        }
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let kernels: Option<Vec<RowKernel>> = weights
            .iter()
            .map(|w| with_blocks!(w, blocks => Some(row_kernel(blocks, w.cols, &input, m)), _dense => None))
            .collect();
        // Dense weights go through candle's matmul, one at a time.
        let Some(kernels) = kernels else {
            return weights.iter().map(|w| w.forward(x)).collect();
        };
        let rows: Vec<usize> = weights.iter().map(|w| w.rows).collect();
        run_kernels(&kernels, &rows, m)
            .into_iter()
            .zip(&rows)
            .map(|(output, &rows)| Tensor::from_vec(output, (m, rows), &Device::Cpu))
            .collect()
    }

    /// Computes `x · Wᵀ` restricted to the weight rows `ids`: returns `(m, ids.len())`, where
    /// column `j` equals column `ids[j]` of [`QWeight::forward`]. Label scoring uses it to get
    /// the logits of a few vocabulary entries without the full output projection.
    pub fn forward_rows(&self, x: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!("matmul input has {k} columns, the weight expects {}", self.cols);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            candle_core::bail!("row {bad} is outside the weight's {} rows", self.rows);
        }
        with_blocks!(
            self,
            blocks => {
                let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let output = matmul_rows(blocks, self.cols, &input, m, ids);
                Tensor::from_vec(output, (m, ids.len()), &Device::Cpu)
            },
            dense => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                x.matmul(&dense.index_select(&ids, 0)?.t()?)
            }
        )
    }

    /// Returns the rows `ids` as an f32 tensor `(ids.len(), cols)`: an embedding lookup.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.rows) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {} tokens", self.rows);
        }
        with_blocks!(
            self,
            blocks => {
                let per_row = blocks.len() / self.rows;
                let mut out = vec![0f32; ids.len() * self.cols];
                for (row, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
                    let start = id as usize * per_row;
                    GgmlType::to_float(&blocks[start..start + per_row], row);
                }
                Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
            },
            dense => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                dense.index_select(&ids, 0)
            }
        )
    }
}

fn block_dtype<T: GgmlType>(_: &[T]) -> GgmlDType {
    T::DTYPE
}

/// Weight blocks with candle's dot product against their activation blocks and, for the types
/// of the bundled models, tierd's tiled product of many rows.
pub trait WeightBlock: GgmlType {
    fn dot(n: usize, xs: &[Self], ys: &[Self::VecDotType]) -> f32 {
        Self::vec_dot(n, xs, ys)
    }

    /// Computes, once per product, the per-block values of the activations that the tiled
    /// kernel reads besides the blocks. Returns empty terms for kernels that need none.
    fn block_terms(activations: &[Self::VecDotType]) -> BlockTerms {
        let _ = activations;
        BlockTerms::default()
    }

    /// Fills `out`, weight-row-major, with the products of the weight rows in `weights` and the
    /// `m` activation rows in `activations`, `blocks` blocks each, through a tiled kernel.
    /// `terms` come from [`WeightBlock::block_terms`] of the same activations. Returns `false`
    /// where the type or the CPU has none, and the caller dots row by row.
    fn tiled(
        weights: &[Self],
        activations: &[Self::VecDotType],
        terms: &BlockTerms,
        blocks: usize,
        m: usize,
        out: &mut [f32],
    ) -> bool {
        let _ = (weights, activations, terms, blocks, m, out);
        false
    }
}

impl WeightBlock for BlockQ4_0 {}
impl WeightBlock for BlockQ5_1 {}
impl WeightBlock for BlockQ2K {}
impl WeightBlock for BlockQ3K {}
impl WeightBlock for BlockQ5K {}

impl WeightBlock for BlockQ4K {
    fn block_terms(activations: &[BlockQ8K]) -> BlockTerms {
        BlockTerms::q4k(activations)
    }

    fn tiled(weights: &[Self], activations: &[BlockQ8K], terms: &BlockTerms, blocks: usize, m: usize, out: &mut [f32]) -> bool {
        panel_kquant::q4k_rows(weights, activations, terms, blocks, m, out)
    }
}

impl WeightBlock for BlockQ6K {
    fn block_terms(activations: &[BlockQ8K]) -> BlockTerms {
        BlockTerms::q6k(activations)
    }

    fn tiled(weights: &[Self], activations: &[BlockQ8K], terms: &BlockTerms, blocks: usize, m: usize, out: &mut [f32]) -> bool {
        panel_kquant::q6k_rows(weights, activations, terms, blocks, m, out)
    }
}

impl WeightBlock for BlockQ5_0 {
    fn block_terms(activations: &[BlockQ8_0]) -> BlockTerms {
        BlockTerms::q5_0(activations)
    }

    fn tiled(weights: &[Self], activations: &[BlockQ8_0], terms: &BlockTerms, blocks: usize, m: usize, out: &mut [f32]) -> bool {
        panel::q5_0_rows(weights, activations, terms, blocks, m, out)
    }
}

impl WeightBlock for BlockQ8_0 {
    fn tiled(weights: &[Self], activations: &[BlockQ8_0], _: &BlockTerms, blocks: usize, m: usize, out: &mut [f32]) -> bool {
        gemm::q8_0_rows(weights, activations, blocks, m, out)
    }
}

impl WeightBlock for BlockQ4_1 {
    fn tiled(weights: &[Self], activations: &[BlockQ8_1], _: &BlockTerms, blocks: usize, m: usize, out: &mut [f32]) -> bool {
        gemm::q4_1_rows(weights, activations, blocks, m, out)
    }
}

/// Computes one weight's outputs for a run of weight rows: called with the first weight row and
/// the output slice of those rows, laid out weight-row-major (`m` values per weight row).
type RowKernel<'a> = Box<dyn Fn(usize, &mut [f32]) + Sync + 'a>;

/// Returns the row kernel of `weights` against `m` activation rows of `input`, which it
/// quantizes once, as llama.cpp does, to the weight type's dot-product type.
fn row_kernel<'a, T>(weights: &'a [T], cols: usize, input: &[f32], m: usize) -> RowKernel<'a>
where
    T: WeightBlock,
    T::VecDotType: ActivationBlock,
{
    let blocks_per_row = cols / T::BLCK_SIZE;
    let activation_blocks = cols / T::VecDotType::BLCK_SIZE;
    let quantized = quantize_activations::<T>(input, cols, m);
    let terms = T::block_terms(&quantized);
    Box::new(move |first_row, out| {
        if m >= gemm::MIN_ROWS {
            let weight_rows = &weights[first_row * blocks_per_row..(first_row + out.len() / m) * blocks_per_row];
            if T::tiled(weight_rows, &quantized, &terms, blocks_per_row, m, out) {
                return;
            }
        }
        for (offset, outputs) in out.chunks_exact_mut(m).enumerate() {
            let start = (first_row + offset) * blocks_per_row;
            let weight_row = &weights[start..start + blocks_per_row];
            for (i, value) in outputs.iter_mut().enumerate() {
                let activations = &quantized[i * activation_blocks..(i + 1) * activation_blocks];
                *value = T::dot(cols, weight_row, activations);
            }
        }
    })
}

/// Runs each kernel over its weight's rows, all in one parallel dispatch so that the threads
/// wake once for the lot, and returns each weight's `(m, rows)` output, row-major.
fn run_kernels(kernels: &[RowKernel], rows: &[usize], m: usize) -> Vec<Vec<f32>> {
    let mut buffers: Vec<Vec<f32>> = rows.iter().map(|&rows| vec![0f32; rows * m]).collect();
    let outputs: Vec<Columns> = buffers.iter_mut().map(|buffer| Columns::new(buffer, m)).collect();
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for (weight, &rows) in rows.iter().enumerate() {
        for first_row in (0..rows).step_by(ROWS_PER_TASK) {
            tasks.push((weight, first_row, ROWS_PER_TASK.min(rows - first_row)));
        }
    }
    // Kernels fill a weight-row-major block, each weight row's `m` values together; it is then
    // spread into the output's columns.
    let run_task = |local: &mut Vec<f32>, &(weight, first_row, count): &(usize, usize, usize)| {
        local.clear();
        local.resize(count * m, 0f32);
        kernels[weight](first_row, local);
        // SAFETY: the tasks cover disjoint row ranges of each weight, so no two tasks write
        // the same output column.
        unsafe { outputs[weight].write(first_row, local) };
    };
    // Decode-sized products go to the spinning pool, in a few contiguous runs of tasks per
    // thread. Prompts stay on rayon, which the rest of a prompt's work also uses.
    let mut done = false;
    if m < PARALLEL_QUANTIZE_ROWS {
        let per_run = tasks.len().div_ceil(rayon::current_num_threads() * RUNS_PER_THREAD).max(1);
        let runs: Vec<&[(usize, usize, usize)]> = tasks.chunks(per_run).collect();
        done = spin_pool::run(runs.len(), &|run| {
            LOCAL.with_borrow_mut(|local| runs[run].iter().for_each(|task| run_task(local, task)));
        });
    }
    if !done {
        tasks.par_iter().for_each_init(Vec::new, run_task);
    }
    drop(outputs);
    buffers
}

/// Runs of tasks per thread when a decode-sized product goes to the spinning pool: enough
/// that a thread slowed by other work does not hold the rest back, few enough that claiming
/// them costs little.
const RUNS_PER_THREAD: usize = 8;

thread_local! {
    /// A kernel's weight-row-major output block, reused across the tasks of the spinning pool.
    static LOCAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The `(m, rows)` output of one weight, shared by parallel tasks that each write the columns
/// of their own weight rows.
struct Columns {
    start: *mut f32,
    m: usize,
    rows: usize,
}

// SAFETY: `Columns` hands out no references; writers guarantee disjoint columns.
unsafe impl Sync for Columns {}

impl Columns {
    fn new(buffer: &mut [f32], m: usize) -> Self {
        let rows = buffer.len().checked_div(m).unwrap_or(0);
        Self { start: buffer.as_mut_ptr(), m, rows }
    }

    /// Writes `values`, which contain `m` values for each weight row from `first_row` on, into
    /// their columns of the output.
    ///
    /// # Safety
    /// No other call may write the same weight rows while this one runs, and the buffer given
    /// to [`Columns::new`] must outlive the call.
    unsafe fn write(&self, first_row: usize, values: &[f32]) {
        let count = values.len() / self.m.max(1);
        assert!(first_row + count <= self.rows, "rows {first_row}..{} of {}", first_row + count, self.rows);
        for i in 0..self.m {
            // SAFETY: `i < m` and `first_row + count <= rows`, so the run lies inside row `i`
            // of the `(m, rows)` buffer.
            let row = unsafe { std::slice::from_raw_parts_mut(self.start.add(i * self.rows + first_row), count) };
            for (r, value) in row.iter_mut().enumerate() {
                *value = values[r * self.m + i];
            }
        }
    }
}

/// Multiplies `m` activation rows by the quantized weight rows, in parallel over weight rows.
fn matmul<T>(weights: &[T], rows: usize, cols: usize, input: &[f32], m: usize) -> Vec<f32>
where
    T: WeightBlock,
    T::VecDotType: ActivationBlock,
{
    let kernel = row_kernel(weights, cols, input, m);
    run_kernels(&[kernel], &[rows], m).pop().unwrap_or_default()
}

/// Quantizes each activation row to the weight type's dot-product blocks, as llama.cpp does.
fn quantize_activations<T>(input: &[f32], cols: usize, m: usize) -> Vec<T::VecDotType>
where
    T: WeightBlock,
    T::VecDotType: ActivationBlock,
{
    let activation_blocks = cols / T::VecDotType::BLCK_SIZE;
    let mut quantized = vec![T::VecDotType::zeros(); m * activation_blocks];
    // A prompt's rows are quantized in parallel; a single decode row is not worth waking the
    // threads for.
    if m >= PARALLEL_QUANTIZE_ROWS {
        input
            .par_chunks_exact(cols)
            .zip(quantized.par_chunks_exact_mut(activation_blocks))
            .for_each(|(row, out)| T::VecDotType::quantize(row, out));
    } else {
        for (row, out) in input.chunks_exact(cols).zip(quantized.chunks_exact_mut(activation_blocks)) {
            T::VecDotType::quantize(row, out);
        }
    }
    quantized
}

/// Multiplies `m` activation rows by the weight rows `ids` only; returns `(m, ids.len())`.
/// The values equal those of [`matmul`] for the same rows, because both quantize the
/// activations the same way and use the same dot product.
fn matmul_rows<T>(weights: &[T], cols: usize, input: &[f32], m: usize, ids: &[u32]) -> Vec<f32>
where
    T: WeightBlock,
    T::VecDotType: ActivationBlock,
{
    let blocks_per_row = cols / T::BLCK_SIZE;
    let activation_blocks = cols / T::VecDotType::BLCK_SIZE;
    let quantized = quantize_activations::<T>(input, cols, m);
    let terms = T::block_terms(&quantized);
    let mut output = vec![0f32; m * ids.len()];
    // The tiled kernels compute each output the same way whatever the tile, so one weight row
    // at a time gives the values of the full product bit for bit.
    if m >= gemm::MIN_ROWS {
        let mut column = vec![0f32; m];
        let mut tiled = true;
        for (j, &id) in ids.iter().enumerate() {
            let start = id as usize * blocks_per_row;
            tiled = T::tiled(&weights[start..start + blocks_per_row], &quantized, &terms, blocks_per_row, m, &mut column);
            if !tiled {
                break;
            }
            for (i, value) in column.iter().enumerate() {
                output[i * ids.len() + j] = *value;
            }
        }
        if tiled {
            return output;
        }
    }
    for (i, outputs) in output.chunks_exact_mut(ids.len().max(1)).enumerate().take(m) {
        let activations = &quantized[i * activation_blocks..(i + 1) * activation_blocks];
        for (value, &id) in outputs.iter_mut().zip(ids) {
            let start = id as usize * blocks_per_row;
            *value = T::dot(cols, &weights[start..start + blocks_per_row], activations);
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// The quantized product agrees with a dense product of the dequantized weights to within
    /// the activation quantization error, for one activation row (row by row) and for seven
    /// (tiled where the type has a tiled kernel), with 37 rows so the last parallel task is short.
    #[test]
    fn quantized_matmul_matches_dense() {
        let (rows, cols) = (37, 512);
        let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let dense = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let quantized = QTensor::quantize(&dense, dtype).unwrap();
            let dequantized = quantized.dequantize(&Device::Cpu).unwrap();
            let count = rows * cols / dtype.block_size();
            let blocks = match dtype {
                GgmlDType::Q4K => Blocks::Q4K(blocks_of(&quantized, count)),
                GgmlDType::Q6K => Blocks::Q6K(blocks_of(&quantized, count)),
                GgmlDType::Q5_0 => Blocks::Q5_0(blocks_of(&quantized, count)),
                GgmlDType::Q8_0 => Blocks::Q8_0(blocks_of(&quantized, count)),
                _ => Blocks::Q4_1(blocks_of(&quantized, count)),
            };
            let weight = QWeight::new(blocks, rows, cols);
            for m in [1, 7] {
                let input: Vec<f32> = (0..m * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
                let x = Tensor::from_vec(input, (m, cols), &Device::Cpu).unwrap();
                let ours: Vec<f32> = weight.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let reference: Vec<f32> =
                    x.matmul(&dequantized.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                // The error bound scales with the magnitude of the terms, not of their sum,
                // because the sums cancel: 8-bit activations carry about 0.4 % error per element.
                let magnitude: Vec<f32> = x
                    .abs()
                    .unwrap()
                    .matmul(&dequantized.abs().unwrap().t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (index, ((a, b), scale)) in ours.iter().zip(&reference).zip(&magnitude).enumerate() {
                    assert!(
                        (a - b).abs() <= 0.01 * scale,
                        "{dtype:?}, m = {m}, output {index}: {a} vs {b} (terms sum to {scale})"
                    );
                }
            }
        }
    }

    /// Copies the blocks of `quantized` into a typed vector.
    fn blocks_of<T: GgmlType>(quantized: &QTensor, count: usize) -> Vec<T> {
        let raw = quantized.data().unwrap();
        let mut blocks = vec![T::zeros(); count];
        assert_eq!(raw.len(), count * std::mem::size_of::<T>());
        // SAFETY: `raw` holds exactly `count` blocks of type `T` in GGUF layout, as checked.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), blocks.as_mut_ptr().cast::<u8>(), raw.len());
        }
        blocks
    }

    /// The fused product of weights of different types, with row counts that do not fill the
    /// last parallel task, equals each weight's own product bit for bit.
    #[test]
    fn forward_many_equals_separate_products() {
        let cols = 512;
        let make = |rows: usize, seed: usize| {
            let values: Vec<f32> = (0..rows * cols).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 50.0).collect();
            Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
        };
        let q4k = QTensor::quantize(&make(40, 1), GgmlDType::Q4K).unwrap();
        let q6k = QTensor::quantize(&make(24, 2), GgmlDType::Q6K).unwrap();
        let q8 = QTensor::quantize(&make(17, 3), GgmlDType::Q8_0).unwrap();
        let weights = [
            QWeight::new(Blocks::Q4K(blocks_of(&q4k, 40 * cols / 256)), 40, cols),
            QWeight::new(Blocks::Q6K(blocks_of(&q6k, 24 * cols / 256)), 24, cols),
            QWeight::new(Blocks::Q8_0(blocks_of(&q8, 17 * cols / 32)), 17, cols),
        ];
        for m in [1, 3] {
            let input: Vec<f32> = (0..m * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let x = Tensor::from_vec(input, (m, cols), &Device::Cpu).unwrap();
            let fused = QWeight::forward_many(&[&weights[0], &weights[1], &weights[2]], &x).unwrap();
            assert_eq!(fused.len(), 3);
            for (weight, fused) in weights.iter().zip(&fused) {
                let separate: Vec<Vec<f32>> = weight.forward(&x).unwrap().to_vec2().unwrap();
                assert_eq!(fused.to_vec2::<f32>().unwrap(), separate, "m = {m}, rows = {}", weight.rows());
            }
        }
    }

    /// Selected rows give exactly the columns of the full product, for quantized and dense
    /// weights, with repeated and out-of-order ids.
    #[test]
    fn forward_rows_equals_full_product_columns() {
        let (rows, cols, m) = (24, 64, 2);
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0).collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let quantized = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
        let mut blocks = vec![BlockQ8_0::zeros(); rows * cols / 32];
        let raw = quantized.data().unwrap();
        // SAFETY: `raw` holds exactly `blocks.len()` Q8_0 blocks in GGUF layout.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), blocks.as_mut_ptr().cast::<u8>(), raw.len());
        }
        let input: Vec<f32> = (0..m * cols).map(|i| ((i * 7 % 23) as f32 - 11.0) / 5.0).collect();
        let x = Tensor::from_vec(input, (m, cols), &Device::Cpu).unwrap();
        let ids = [17u32, 3, 3, 23, 0];

        for weight in [
            QWeight::new(Blocks::Q8_0(blocks), rows, cols),
            QWeight::new(Blocks::Dense(dense), rows, cols),
        ] {
            let full: Vec<Vec<f32>> = weight.forward(&x).unwrap().to_vec2().unwrap();
            let selected: Vec<Vec<f32>> = weight.forward_rows(&x, &ids).unwrap().to_vec2().unwrap();
            for i in 0..m {
                for (j, &id) in ids.iter().enumerate() {
                    assert_eq!(selected[i][j], full[i][id as usize], "row {i}, id {id}");
                }
            }
            assert!(weight.forward_rows(&x, &[rows as u32]).is_err());
        }
    }
}
