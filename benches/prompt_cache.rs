//! Time to first token of a generation request whose 256-token system prompt is in the prompt
//! cache, against the same request without the cache, on the real models.
//!
//! Each iteration runs the worker's `generate` with `max_tokens = 1`: prefill, then sampling
//! of the first token, which is what a client waits for before the first streamed chunk.
//! - `uncached`: the whole prompt of 256 + 16 tokens runs from an empty KV cache.
//! - `cached`: the prompt cache contains the 256 system prompt tokens (set up outside the timed
//!   part), so the request copies their keys and values and runs only the question. The timed
//!   part also stores the request in the cache after the first token, which a client does not
//!   wait for, so the figure slightly overstates the time to first token.
//!
//! Run with `cargo bench --bench prompt_cache`; BENCHMARKS.md records the figures.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tierd::engine::generate::generate;
use tierd::engine::prompt_cache::Sequence;
use tierd::engine::{GenerationEvent, GenerationRequest, PromptCache, PromptCacheConfig, SamplingParams};
use tierd::model::LoadedModel;
use tokio::sync::mpsc;

const MODELS: [(&str, &str); 2] = [
    ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
];

const SYSTEM_TOKENS: usize = 256;
const QUESTION_TOKENS: usize = 16;

/// Returns a system prompt of at least `SYSTEM_TOKENS` tokens in any of the models.
fn system_text() -> String {
    let mut text = String::from("You are a careful assistant for a hardware store.\n");
    for rule in 1..=40 {
        text.push_str(&format!(
            "Rule {rule}: answer in plain English, keep the answer under {} words, and mention aisle {}.\n",
            rule * 3 + 10,
            rule * 7 % 23 + 1
        ));
    }
    text
}

fn encode(model: &LoadedModel, text: &str, bos: bool) -> Vec<u32> {
    model.tokenizer.encode_fast(text, bos).expect("tokenize").get_ids().to_vec()
}

/// Runs `request` to its first token and returns the finished event's cached token count.
fn first_token(model: &Arc<LoadedModel>, request: &GenerationRequest, cache: Option<&mut PromptCache>) -> usize {
    let (events, mut receiver) = mpsc::channel(64);
    generate(model, request, Duration::ZERO, &events, cache);
    let mut cached = None;
    while let Ok(event) = receiver.try_recv() {
        match event {
            GenerationEvent::Finished { cached_tokens, .. } => cached = Some(cached_tokens),
            GenerationEvent::Failed(message) => panic!("generation failed: {message}"),
            GenerationEvent::Delta { .. } => {}
        }
    }
    cached.expect("the generation did not finish")
}

fn bench_prompt_cache(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    for (id, file) in MODELS {
        let path = dir.join(id).join(file);
        if !path.is_file() {
            eprintln!("skipping {id}: {} is missing; run scripts/fetch-models.sh", path.display());
            continue;
        }
        let model = Arc::new(LoadedModel::load(&path).expect("load model"));
        let system: Vec<u32> = encode(&model, &system_text(), true)[..SYSTEM_TOKENS].to_vec();
        let question = encode(&model, "Question: which aisle has the garden hoses, the watering cans, the rakes and the outdoor extension cords?", false);
        let prompt = [system.as_slice(), &question[..QUESTION_TOKENS]].concat();
        let request = GenerationRequest {
            request_id: "bench".into(),
            prompt_tokens: prompt,
            max_tokens: 1,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            logprobs: None,
            produced: Default::default(),
        };

        // The system prompt's keys and values, computed once and copied into each cache.
        let mut stored = Sequence::new(model.network.as_ref(), SYSTEM_TOKENS);
        stored.forward(model.network.as_ref(), &system).expect("prefill the system prompt");
        let config = PromptCacheConfig::default();
        let filled_cache = || {
            let mut cache = PromptCache::new(config.clone(), Arc::default());
            let copy = Sequence {
                tokens: stored.tokens.clone(),
                cache: stored.cache.copy_prefix(SYSTEM_TOKENS, SYSTEM_TOKENS),
            };
            cache.insert(copy, SYSTEM_TOKENS);
            cache
        };
        assert_eq!(first_token(&model, &request, Some(&mut filled_cache())), SYSTEM_TOKENS);

        let mut group = c.benchmark_group(format!("{id}/first_token_{SYSTEM_TOKENS}_system_{QUESTION_TOKENS}_question"));
        group.sample_size(10);
        group.bench_function("uncached", |b| b.iter(|| first_token(&model, &request, None)));
        group.bench_function("cached", |b| {
            b.iter_batched(
                filled_cache,
                |mut cache| first_token(&model, &request, Some(&mut cache)),
                BatchSize::PerIteration,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bench_prompt_cache);
criterion_main!(benches);
