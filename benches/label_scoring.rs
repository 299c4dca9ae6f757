//! Cost per input of classifying by label scoring against generating the label with the full
//! vocabulary, on the real models.
//!
//! For one review, each model
//! - `generate_label`: prefills the prompt from an empty cache, then decodes greedily for as
//!   many steps as the longest label has tokens, computing all vocabulary logits each step,
//!   which is what classifying through chat completions costs;
//! - `score_labels`: prefills the same prompt from an empty cache, then scores both labels
//!   with logits for the label tokens only;
//! - `score_labels_cached`: scores two reviews in turn with one prefix cache, so only each
//!   review runs while the shared instructions stay cached, as for consecutive requests of one
//!   task. Each iteration covers two inputs.
//!
//! `label_step` isolates what label scoring saves: one more token after a cached prompt, with
//! logits for the whole vocabulary or for the two label tokens only. Every label token after
//! the first costs one such step, in both approaches.
//!
//! Run with `cargo bench --bench label_scoring`; BENCHMARKS.md records the figures.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use tierd::classify::label_scoring::{score_prompt, LabelSet, PrefixCache};
use tierd::model::LoadedModel;

const MODELS: [(&str, &str); 2] = [
    ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
];

const INSTRUCTIONS: &str = "Label the sentiment of each review as positive or negative.\n\n\
    Review: Great value and it works perfectly.\nSentiment: positive\n\n\
    Review: It stopped working after a week.\nSentiment: negative\n\n";
const REVIEW: &str = "Review: The battery lasts two days and the screen is bright and sharp.\nSentiment:";
const OTHER_REVIEW: &str = "Review: Shipping took a month and the box arrived crushed.\nSentiment:";

fn encode(model: &LoadedModel, text: &str, bos: bool) -> Vec<u32> {
    model.tokenizer.encode_fast(text, bos).expect("tokenize").get_ids().to_vec()
}

fn bench_label_scoring(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    for (id, file) in MODELS {
        let path = dir.join(id).join(file);
        if !path.is_file() {
            eprintln!("skipping {id}: {} is missing; run scripts/fetch-models.sh", path.display());
            continue;
        }
        let model = LoadedModel::load(&path).expect("load model");
        let network = model.network.as_ref();
        let prompt = encode(&model, &format!("{INSTRUCTIONS}{REVIEW}"), true);
        let other = encode(&model, &format!("{INSTRUCTIONS}{OTHER_REVIEW}"), true);
        let labels: Vec<Vec<u32>> = [" positive", " negative"].iter().map(|t| encode(&model, t, false)).collect();
        let steps = labels.iter().map(Vec::len).max().unwrap_or(1);
        let set = LabelSet::new(labels, 0).expect("label set");
        let capacity = prompt.len().max(other.len()) + steps + 1;

        let mut group = c.benchmark_group(format!("{id}/classify_{}_tokens", prompt.len()));
        group.sample_size(10);
        group.bench_function("generate_label", |b| {
            b.iter(|| {
                let mut cache = network.new_cache(capacity);
                let mut logits = network.forward(&prompt, &mut cache).expect("prefill");
                for _ in 1..steps {
                    let next = logits.argmax(0).expect("argmax").to_scalar::<u32>().expect("token");
                    logits = network.forward(&[next], &mut cache).expect("decode");
                }
                logits
            })
        });
        group.bench_function("score_labels", |b| {
            b.iter(|| {
                let mut prefix = PrefixCache::new(network, capacity);
                score_prompt(network, &mut prefix, &prompt, &set).expect("score")
            })
        });
        group.bench_function("score_labels_cached", |b| {
            let mut prefix = PrefixCache::new(network, capacity);
            b.iter(|| {
                // Alternating reviews keep the shared instructions cached but never the review.
                score_prompt(network, &mut prefix, &other, &set).expect("score other");
                score_prompt(network, &mut prefix, &prompt, &set).expect("score")
            })
        });
        group.finish();

        // One label token after a cached prompt: the layers run for one position in both
        // cases, and only the output projection differs.
        let mut group = c.benchmark_group(format!("{id}/label_step"));
        group.sample_size(20);
        let mut cache = network.new_cache(capacity);
        network.forward(&prompt, &mut cache).expect("prefill");
        let next = [prompt[prompt.len() - 1]];
        let rows: Vec<u32> = [" positive", " negative"].iter().map(|t| encode(&model, t, false)[0]).collect();
        group.bench_function("full_vocabulary", |b| {
            b.iter(|| {
                cache.truncate(prompt.len());
                network.forward(&next, &mut cache).expect("step")
            })
        });
        group.bench_function("label_rows", |b| {
            b.iter(|| {
                cache.truncate(prompt.len());
                let hidden = network.forward_hidden(&next, &mut cache).expect("step");
                network.output_rows(&hidden, &rows).expect("rows")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_label_scoring);
criterion_main!(benches);
