//! Sentence embeddings with the bundled MiniLM encoder, one input at a time against batches of
//! 8 and 32 (the encoder's batch size), on short product reviews written for this benchmark.
//! The `worker` group sends 16 one-sentence requests at once through the encoder's worker,
//! which merges them into one forward pass, against the same requests one after another.
//!
//! Throughput is in sentences. Run with `cargo bench --bench encoder`; BENCHMARKS.md records
//! the figures.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tierd::classify::encoder::{PassLimits, SentenceEncoder};
use tierd::classify::encoder_worker::{BatchSettings, EncoderWorker};

/// Requests in flight at once in the `worker` group.
const CONCURRENT_REQUESTS: usize = 16;

const SENTENCES: [&str; 8] = [
    "The battery lasts two days and the screen is bright and sharp.",
    "Shipping took a month and the box arrived crushed.",
    "Works as described, nothing more.",
    "I would not buy this again: the strap broke on the first day.",
    "Customer service replaced it within a week, very helpful people.",
    "Too loud for an office, but fine in the garage.",
    "The manual is missing half of the steps and the pictures are wrong.",
    "Great value for the price.",
];

fn bench_encoder(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipping the encoder: {} is missing; run scripts/fetch-models.sh", dir.display());
        return;
    }
    let encoder = SentenceEncoder::load(&dir).expect("load encoder");
    let inputs: Vec<Vec<u32>> = SENTENCES
        .iter()
        .cycle()
        .take(32)
        .map(|text| encoder.tokenize(text).expect("tokenize"))
        .collect();

    let mut group = c.benchmark_group("all-minilm-l6-v2");
    group.sample_size(20);
    for batch in [1, 8, 32] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("embed_batch_{batch}"), |b| {
            b.iter(|| encoder.embed(&inputs[..batch]).expect("embed"))
        });
    }
    group.finish();

    // The worker gets its own copy of the model.
    let settings = BatchSettings {
        queue_capacity: 256,
        window: Duration::ZERO,
        limits: PassLimits::default(),
    };
    let worker = EncoderWorker::spawn("bench", SentenceEncoder::load(&dir).expect("load encoder"), &settings, None)
        .expect("spawn worker");
    let requests: Vec<Vec<Vec<u32>>> = inputs[..CONCURRENT_REQUESTS].iter().map(|ids| vec![ids.clone()]).collect();
    let mut group = c.benchmark_group("all-minilm-l6-v2-worker");
    group.sample_size(20);
    group.throughput(Throughput::Elements(CONCURRENT_REQUESTS as u64));
    group.bench_function(format!("requests_{CONCURRENT_REQUESTS}_one_by_one"), |b| {
        b.iter(|| {
            for request in &requests {
                let reply = worker.submit(request.clone()).expect("queue has room");
                reply.blocking_recv().expect("a reply").expect("embeddings");
            }
        })
    });
    group.bench_function(format!("requests_{CONCURRENT_REQUESTS}_at_once"), |b| {
        b.iter(|| {
            let replies: Vec<_> = requests
                .iter()
                .map(|request| worker.submit(request.clone()).expect("queue has room"))
                .collect();
            for reply in replies {
                reply.blocking_recv().expect("a reply").expect("embeddings");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_encoder);
criterion_main!(benches);
