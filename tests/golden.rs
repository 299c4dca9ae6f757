//! tierd's models against llama.cpp's reference outputs in `tests/golden/`.
//!
//! For every model and prompt: the prompt tokens from tierd's tokenizer equal llama.cpp's, the
//! top-5 next-token logits match within `LOGIT_TOLERANCE`, and the first 32 greedy tokens are
//! identical. The long prompt (past Gemma 3's 512-token sliding window) is also fed in 256-token
//! chunks and one token at a time, which must give the same logits.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tierd::model::{KvCache, LoadedModel};

const LOGIT_TOLERANCE: f32 = 0.3;

#[derive(Deserialize)]
struct Golden {
    model: GoldenModel,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct GoldenModel {
    file: String,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    tokens: Vec<u32>,
    top_logits: Vec<(u32, f32)>,
    greedy: Vec<u32>,
    greedy_top_logits: Vec<Vec<(u32, f32)>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(model_id: &str) -> (LoadedModel, Golden) {
    let golden_path = root().join("tests/golden").join(format!("{model_id}.json"));
    let text = std::fs::read_to_string(&golden_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", golden_path.display()));
    let golden: Golden = serde_json::from_str(&text).expect("parse golden file");
    let model_path = root().join("models").join(model_id).join(&golden.model.file);
    let model = LoadedModel::load(&model_path)
        .unwrap_or_else(|e| panic!("load {}: {e}; run scripts/fetch-models.sh", model_path.display()));
    (model, golden)
}

fn prompt_text(name: &str) -> String {
    let path = root().join("tests/golden/prompts").join(format!("{name}.txt"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `tokens` in pieces of `chunk` tokens and returns the last logits.
fn prefill(model: &LoadedModel, cache: &mut KvCache, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut logits = None;
    for piece in tokens.chunks(chunk) {
        logits = Some(model.network.forward(piece, cache).expect("forward"));
    }
    logits.expect("non-empty prompt").to_vec1().expect("logits to vec")
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// Returns a description of every reference logit that `logits` misses by more than the
/// tolerance.
fn logit_errors(logits: &[f32], reference: &[(u32, f32)], label: &str) -> Vec<String> {
    reference
        .iter()
        .filter_map(|&(id, expected)| {
            let actual = logits[id as usize];
            ((actual - expected).abs() > LOGIT_TOLERANCE).then(|| {
                format!("{label}: token {id} logit {actual:.3}, llama.cpp {expected:.3}")
            })
        })
        .collect()
}

fn check_model(model_id: &str) {
    let (model, golden) = load(model_id);
    let mut failures = Vec::new();

    for case in &golden.cases {
        let label = format!("{model_id}/{}", case.prompt);
        let ours = model
            .tokenizer
            .encode_fast(prompt_text(&case.prompt), true)
            .expect("encode");
        if ours.get_ids() != case.tokens.as_slice() {
            failures.push(format!("{label}: prompt tokens differ from llama.cpp's"));
        }

        let max_len = case.tokens.len() + case.greedy.len() + 1;
        let mut cache = model.network.new_cache(max_len);
        let mut logits = prefill(&model, &mut cache, &case.tokens, case.tokens.len());
        failures.extend(logit_errors(&logits, &case.top_logits, &format!("{label} one batch")));

        let mut greedy = Vec::new();
        for step in 0..case.greedy.len() {
            let token = argmax(&logits);
            greedy.push(token);
            if token != case.greedy[step] {
                failures.push(format!(
                    "{label}: greedy token {step} is {token}, llama.cpp {} (its top logits {:?}; ours for them {:?})",
                    case.greedy[step],
                    case.greedy_top_logits[step],
                    case.greedy_top_logits[step]
                        .iter()
                        .map(|(id, _)| logits[*id as usize])
                        .collect::<Vec<_>>()
                ));
                break;
            }
            if step + 1 < case.greedy.len() {
                let output = model.network.forward(&[token], &mut cache).expect("decode");
                logits = output.to_vec1().expect("logits to vec");
            }
        }

        if case.prompt == "long" {
            for chunk in [256, 1] {
                let mut cache = model.network.new_cache(max_len);
                let logits = prefill(&model, &mut cache, &case.tokens, chunk);
                failures.extend(logit_errors(
                    &logits,
                    &case.top_logits,
                    &format!("{label} in chunks of {chunk}"),
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn qwen2_matches_llama_cpp() {
    check_model("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("smollm2-135m-instruct");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model("gemma3-270m");
}

#[test]
fn golden_files_cover_sliding_window() {
    let (model, golden) = load("gemma3-270m");
    let window = model.network.hparams().sliding_window.expect("gemma3 has a window");
    let long = golden
        .cases
        .iter()
        .find(|case| case.prompt == "long")
        .expect("a long case");
    assert!(long.tokens.len() > window + 64, "{} tokens", long.tokens.len());
    assert!(Path::new(&root().join("tests/golden/prompts/long.txt")).is_file());
}
