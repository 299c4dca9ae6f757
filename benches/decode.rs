//! The hot loop on the real models: one decode step after a 128-token prompt, and a 128-token
//! prefill, for each model that `scripts/fetch-models.sh` has fetched.
//!
//! Run with `cargo bench --bench decode`; BENCHMARKS.md records the figures.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tierd::manifest::{Manifest, ModelSource};
use tierd::model::LoadedModel;

const PROMPT_TOKENS: usize = 128;

fn models() -> Vec<(String, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let manifest = match Manifest::load(&dir.join("models.toml")) {
        Ok(manifest) => manifest,
        Err(error) => {
            eprintln!("no models to benchmark: {error}");
            return Vec::new();
        }
    };
    manifest
        .models
        .into_iter()
        .filter(|entry| matches!(entry.source, ModelSource::Pypi { .. }))
        .map(|entry| {
            let path = dir.join(&entry.id).join(&entry.file);
            (entry.id, path)
        })
        .filter(|(id, path)| {
            let present = path.is_file();
            if !present {
                eprintln!("skipping {id}: {} is missing; run scripts/fetch-models.sh", path.display());
            }
            present
        })
        .collect()
}

/// Tokenizes real text and cuts it to `PROMPT_TOKENS` tokens.
fn prompt(model: &LoadedModel) -> Vec<u32> {
    let text = include_str!("../tests/golden/prompts/long.txt");
    let encoding = model.tokenizer.encode_fast(text, true).expect("tokenize prompt");
    encoding.get_ids()[..PROMPT_TOKENS].to_vec()
}

fn bench_models(c: &mut Criterion) {
    for (id, path) in models() {
        let model = LoadedModel::load(&path).expect("load model");
        let tokens = prompt(&model);

        let mut group = c.benchmark_group(&id);
        group.sample_size(10);

        group.throughput(Throughput::Elements(PROMPT_TOKENS as u64));
        group.bench_function("prefill_128", |b| {
            b.iter(|| {
                let mut cache = model.network.new_cache(PROMPT_TOKENS + 1);
                model.network.forward(&tokens, &mut cache).expect("prefill")
            })
        });

        group.throughput(Throughput::Elements(1));
        let mut cache = model.network.new_cache(PROMPT_TOKENS + 1);
        model.network.forward(&tokens, &mut cache).expect("prefill");
        group.bench_function("decode_step_at_128", |b| {
            b.iter(|| {
                let output = model.network.forward(&[tokens[0]], &mut cache).expect("decode");
                cache.truncate(PROMPT_TOKENS);
                output
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_models);
criterion_main!(benches);
