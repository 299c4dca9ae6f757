//! The quantized matrix products alone, at the shapes of the bundled models: one activation row
//! (a decode step, dotted row by row) and 128 rows (a prompt chunk, through the tiled kernels
//! where the CPU has them).
//!
//! Throughput is in multiply-adds (rows × columns × activation rows). Run with
//! `cargo bench --bench kernels`; BENCHMARKS.md records the figures.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_1, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tierd::kernels::qmatmul::{Blocks, QWeight};

/// Returns `len` values spread over [-1, 1].
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.5) - 1.0).collect()
}

fn quantize<T: GgmlType>(rows: usize, cols: usize) -> Vec<T> {
    let mut blocks = vec![T::zeros(); rows * cols / T::BLCK_SIZE];
    T::from_float(&values(rows * cols, 1), &mut blocks);
    blocks
}

/// A benchmark name, a function that quantizes a `(rows, columns)` matrix, rows and columns.
type Shape = (&'static str, fn(usize, usize) -> Blocks, usize, usize);

/// Returns each weight type at a shape where a bundled model uses it, with its name.
fn weights() -> Vec<(&'static str, QWeight)> {
    let shapes: [Shape; 5] = [
        ("q5_0_1024x640", |r, c| Blocks::Q5_0(quantize::<BlockQ5_0>(r, c)), 1024, 640),
        ("q8_0_1024x640", |r, c| Blocks::Q8_0(quantize::<BlockQ8_0>(r, c)), 1024, 640),
        ("q4_1_1536x576", |r, c| Blocks::Q4_1(quantize::<BlockQ4_1>(r, c)), 1536, 576),
        ("q4k_640x2048", |r, c| Blocks::Q4K(quantize::<BlockQ4K>(r, c)), 640, 2048),
        ("q6k_640x2048", |r, c| Blocks::Q6K(quantize::<BlockQ6K>(r, c)), 640, 2048),
    ];
    shapes
        .into_iter()
        .map(|(name, make, rows, cols)| (name, QWeight::new(make(rows, cols), rows, cols)))
        .collect()
}

fn bench_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("qmatmul");
    group.sample_size(20);
    for (name, weight) in weights() {
        for m in [1, 128] {
            let x = Tensor::from_vec(values(m * weight.cols(), 2), (m, weight.cols()), &Device::Cpu)
                .expect("activation tensor");
            group.throughput(Throughput::Elements((weight.rows() * weight.cols() * m) as u64));
            group.bench_function(format!("{name}_m{m}"), |b| b.iter(|| weight.forward(&x).expect("product")));
        }
    }
    group.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
