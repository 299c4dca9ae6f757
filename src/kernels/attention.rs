//! Causal attention of a batch of query rows over the key/value cache.
//!
//! Each output (one query row, one head) is computed by the same sequence of float operations
//! whatever the batch it arrives in: its scores against the keys it may see, their softmax,
//! and the weighted sum of values. So a prompt run in one batch and the same prompt run in
//! pieces give bit-identical results, which label scoring and the prompt prefix cache rely
//! on. A general matrix product would pick its summation order from the batch shape instead.
//! Skipping the masked keys also halves the work of a prompt.

use rayon::prelude::*;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_head: usize,
    /// Key/value heads. Each is shared by `n_head / n_kv_head` query heads.
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Position of the first query row. The cache contains the keys of every earlier position.
    pub start_pos: usize,
    /// Sliding window: a query attends only to keys less than `window` positions behind it.
    pub window: Option<usize>,
    /// Factor applied to each score before the softmax.
    pub scale: f32,
}

/// Below this many multiply-adds a call runs on the calling thread, because waking the pool
/// would cost more than the work (an estimate: a decode step over a few hundred positions).
const PARALLEL_WORK: usize = 1 << 20;

/// Computes attention for the query rows `queries`, laid out `(seq, n_head, head_dim)`, over
/// `keys` and `values`, laid out `(positions, n_kv_head, head_dim)` from position 0 and
/// covering at least every query's position. Query row `i` sits at position `start_pos + i`
/// and attends to the keys at positions up to its own. Returns `(seq, n_head * head_dim)`.
pub fn causal_attention(queries: &[f32], keys: &[f32], values: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape { n_head, n_kv_head, head_dim, start_pos, .. } = shape;
    let row = n_kv_head * head_dim;
    let seq = queries.len() / (n_head * head_dim);
    assert!(
        n_kv_head > 0 && n_head % n_kv_head == 0 && queries.len() == seq * n_head * head_dim,
        "{} query values for {n_head} heads of {head_dim}, {n_kv_head} key/value heads",
        queries.len()
    );
    let positions = start_pos + seq;
    assert!(
        keys.len() >= positions * row && values.len() >= positions * row,
        "the cache holds {} key and {} value positions, the queries need {positions}",
        keys.len() / row,
        values.len() / row
    );

    let mut out = vec![0f32; queries.len()];
    // One task per (query row, head): `out` and `queries` share the layout, so chunk `t`
    // of either belongs to row `t / n_head` and head `t % n_head`.
    let task = |(t, (out, query)): (usize, (&mut [f32], &[f32])), scores: &mut Vec<f32>| {
        let (i, head) = (t / n_head, t % n_head);
        attend_one(query, keys, values, shape, start_pos + i, head / (n_head / n_kv_head), scores, out);
    };
    let work = seq * n_head * positions * head_dim;
    let tasks = out.chunks_exact_mut(head_dim).zip(queries.chunks_exact(head_dim));
    if work < PARALLEL_WORK {
        let mut scores = Vec::new();
        tasks.enumerate().for_each(|item| task(item, &mut scores));
    } else {
        out.par_chunks_exact_mut(head_dim)
            .zip(queries.par_chunks_exact(head_dim))
            .enumerate()
            .for_each_init(Vec::new, |scores, item| task(item, scores));
    }
    out
}

/// Computes the attention of one query vector at position `pos` through key/value head `kv_head`.
#[allow(clippy::too_many_arguments)]
fn attend_one(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    shape: AttentionShape,
    pos: usize,
    kv_head: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = shape.head_dim;
    let row = shape.n_kv_head * head_dim;
    let first = shape.window.map_or(0, |window| (pos + 1).saturating_sub(window));
    let at = |j: usize| (j * row + kv_head * head_dim)..(j * row + (kv_head + 1) * head_dim);

    scores.clear();
    scores.extend((first..=pos).map(|j| dot(query, &keys[at(j)]) * shape.scale));
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        sum += *score;
    }
    out.fill(0.0);
    for (j, &weight) in (first..=pos).zip(scores.iter()) {
        for (o, v) in out.iter_mut().zip(&values[at(j)]) {
            *o += weight * v;
        }
    }
    let norm = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= norm;
    }
}

/// Lanes of [`dot`]: four AVX2 registers, so that four FMA chains run at once.
const LANES: usize = 32;

/// Returns the dot product, summed in [`LANES`] lanes of FMAs, then the lanes by halves, then
/// the tail. This fixed order makes the results independent of the batch. The AVX2 version and
/// the portable one follow the same order and give the same bits.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { x86::dot(a, b) };
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = dot_tail(a_chunks.remainder(), b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            lanes[lane] = x[lane].mul_add(y[lane], lanes[lane]);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            lanes[lane] += lanes[lane + width];
        }
        width /= 2;
    }
    lanes[0] + tail
}

/// Returns the sum, in order, of the products past the last full run of lanes.
fn dot_tail(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |sum, (x, y)| x.mul_add(*y, sum))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{dot_tail, LANES};
    use crate::kernels::gemm::x86::horizontal_sum;

    /// [`super::dot_portable`] with one register per eight lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let len = a.len().min(b.len());
        let full = len / LANES * LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        let (a_ptr, b_ptr) = (a.as_ptr(), b.as_ptr());
        for start in (0..full).step_by(LANES) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `start + 8 * k + 8 <= full <= len`, inside both slices.
                let (x, y) = unsafe {
                    (_mm256_loadu_ps(a_ptr.add(start + 8 * k)), _mm256_loadu_ps(b_ptr.add(start + 8 * k)))
                };
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
        }
        // Lanes `l` and `l + 16` first, then `l` and `l + 8`: register 0 with 2, 1 with 3.
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        horizontal_sum(sum) + dot_tail(&a[full..len], &b[full..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::sample;

    /// Attention computed in f64 with an explicit mask over all positions.
    fn reference(queries: &[f32], keys: &[f32], values: &[f32], shape: AttentionShape) -> Vec<f64> {
        let AttentionShape { n_head, n_kv_head, head_dim, start_pos, window, scale } = shape;
        let seq = queries.len() / (n_head * head_dim);
        let row = n_kv_head * head_dim;
        let mut out = vec![0f64; queries.len()];
        for i in 0..seq {
            let pos = start_pos + i;
            for head in 0..n_head {
                let kv = head / (n_head / n_kv_head);
                let q = &queries[(i * n_head + head) * head_dim..][..head_dim];
                let visible: Vec<usize> =
                    (0..start_pos + seq).filter(|&j| j <= pos && window.is_none_or(|w| pos - j < w)).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let k = &keys[j * row + kv * head_dim..][..head_dim];
                        q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (&j, w) in visible.iter().zip(&weights) {
                    let v = &values[j * row + kv * head_dim..][..head_dim];
                    for (d, &value) in v.iter().enumerate() {
                        out[(i * n_head + head) * head_dim + d] += w / total * value as f64;
                    }
                }
            }
        }
        out
    }

    fn shapes() -> Vec<AttentionShape> {
        let base = AttentionShape { n_head: 6, n_kv_head: 2, head_dim: 20, start_pos: 0, window: None, scale: 0.25 };
        vec![
            base,
            AttentionShape { n_head: 4, n_kv_head: 4, head_dim: 64, ..base },
            AttentionShape { window: Some(5), ..base },
            AttentionShape { n_head: 4, n_kv_head: 1, head_dim: 256, window: Some(3), ..base },
        ]
    }

    /// Agrees with the f64 reference, including grouped heads, a head size below the 32 lanes
    /// of the dot product, and sliding windows.
    #[test]
    fn matches_reference() {
        for shape in shapes() {
            let (seq, start_pos) = (9, 4);
            let shape = AttentionShape { start_pos, ..shape };
            let row = shape.n_kv_head * shape.head_dim;
            let queries = sample(seq * shape.n_head * shape.head_dim, 1);
            let keys = sample((start_pos + seq) * row, 2);
            let values = sample((start_pos + seq) * row, 3);
            let ours = causal_attention(&queries, &keys, &values, shape);
            let expected = reference(&queries, &keys, &values, shape);
            for (index, (a, b)) in ours.iter().zip(&expected).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-5, "{shape:?}, value {index}: {a} vs {b}");
            }
        }
    }

    /// The AVX2 dot product gives the portable one's bits, for lengths with and without a tail.
    #[test]
    fn dot_paths_agree() {
        for len in [64, 256, 80, 7] {
            let (a, b) = (sample(len, 7), sample(len, 8));
            assert_eq!(dot(&a, &b).to_bits(), dot_portable(&a, &b).to_bits(), "length {len}");
        }
    }

    /// A batch of query rows gives bit for bit the values of the same rows run one at a time,
    /// and of a batch large enough to run in parallel.
    #[test]
    fn batch_equals_rows_one_at_a_time() {
        for shape in shapes() {
            let seq = 300;
            let row = shape.n_kv_head * shape.head_dim;
            let width = shape.n_head * shape.head_dim;
            let queries = sample(seq * width, 4);
            let keys = sample(seq * row, 5);
            let values = sample(seq * row, 6);
            let batch = causal_attention(&queries, &keys, &values, shape);
            for i in [0, 1, 7, seq - 1] {
                let one = AttentionShape { start_pos: i, ..shape };
                let alone = causal_attention(&queries[i * width..(i + 1) * width], &keys, &values, one);
                assert_eq!(alone, batch[i * width..(i + 1) * width], "{shape:?}, row {i}");
            }
        }
    }
}
