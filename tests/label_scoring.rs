//! Label scoring on a real GGUF model against a direct computation from full-vocabulary
//! logits, and the prompt prefix cache against scoring from an empty cache.

use std::path::Path;

use tierd::classify::label_scoring::{score_prompt, LabelSet, PrefixCache};
use tierd::model::{LanguageModel, LoadedModel};

/// Scoring runs the label tokens in one batch after the prompt, while the direct computation
/// runs each prefix from scratch. Both compute every token's row with the same operations, so
/// they differ only in how the log-probabilities are summed.
const TOLERANCE: f64 = 1e-9;

fn smollm() -> LoadedModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing; run scripts/fetch-models.sh", path.display());
    LoadedModel::load(&path).expect("load smollm2")
}

fn encode(model: &LoadedModel, text: &str, bos: bool) -> Vec<u32> {
    model.tokenizer.encode_fast(text, bos).expect("tokenize").get_ids().to_vec()
}

/// Log-probability of `label` after `prompt` when decoding is restricted to `labels`: at each
/// step, softmax over the next tokens that some label with the same prefix allows, computed
/// from the full logits of a fresh forward pass.
fn direct_log_prob(model: &dyn LanguageModel, prompt: &[u32], labels: &[Vec<u32>], label: &[u32]) -> f64 {
    let mut total = 0.0;
    for k in 0..label.len() {
        let prefix = &label[..k];
        let mut allowed: Vec<u32> = labels
            .iter()
            .filter(|l| l.len() > k && l.starts_with(prefix))
            .map(|l| l[k])
            .collect();
        allowed.sort_unstable();
        allowed.dedup();
        let mut tokens = prompt.to_vec();
        tokens.extend_from_slice(prefix);
        let mut cache = model.new_cache(tokens.len());
        let logits: Vec<f32> = model.forward(&tokens, &mut cache).expect("forward").to_vec1().expect("logits");
        let max = allowed.iter().map(|&t| logits[t as usize] as f64).fold(f64::NEG_INFINITY, f64::max);
        let log_sum = allowed.iter().map(|&t| (logits[t as usize] as f64 - max).exp()).sum::<f64>().ln() + max;
        total += logits[label[k] as usize] as f64 - log_sum;
    }
    total
}

#[test]
fn scores_match_full_vocabulary() {
    let model = smollm();
    let network = model.network.as_ref();
    let prompt = encode(&model, "Review: The screen cracked on day one.\nSentiment:", true);
    // Multi-token labels that share a first token, so the trie has an inner node.
    let labels: Vec<Vec<u32>> = [" negative", " positive", " mixed feelings", " mixed results"]
        .iter()
        .map(|text| encode(&model, text, false))
        .collect();
    assert!(labels.iter().any(|l| l.len() > 1), "expected a multi-token label");
    let set = LabelSet::new(labels.clone(), 0).expect("label set");

    let mut prefix = PrefixCache::new(network, 512);
    let scores = score_prompt(network, &mut prefix, &prompt, &set).expect("score");
    let total: f64 = scores.log_probs.iter().map(|l| l.exp()).sum();
    assert!((total - 1.0).abs() < 1e-9, "label probabilities sum to {total}");
    for (label, score) in labels.iter().zip(&scores.log_probs) {
        let direct = direct_log_prob(network, &prompt, &labels, label);
        assert!((score - direct).abs() < TOLERANCE, "label {label:?}: {score} vs {direct}");
    }
    assert_eq!(scores.prompt_tokens, prompt.len());
    assert_eq!(scores.cached_tokens, 0);
}

#[test]
fn prefix_cache_matches_fresh_scoring() {
    let model = smollm();
    let network = model.network.as_ref();
    let labels: Vec<Vec<u32>> = [" yes", " no"].iter().map(|t| encode(&model, t, false)).collect();
    let set = LabelSet::new(labels, 0).expect("label set");
    let first = encode(&model, "Question: is the sky blue on a clear day?\nAnswer:", true);
    let second = encode(&model, "Question: is the sky green on a clear day?\nAnswer:", true);

    let mut shared = PrefixCache::new(network, 512);
    score_prompt(network, &mut shared, &first, &set).expect("score first");
    let reused = score_prompt(network, &mut shared, &second, &set).expect("score second");
    assert!(reused.cached_tokens > 0, "no prefix was reused");
    assert!(reused.cached_tokens < second.len());

    let mut fresh = PrefixCache::new(network, 512);
    let expected = score_prompt(network, &mut fresh, &second, &set).expect("score fresh");
    for (a, b) in reused.log_probs.iter().zip(&expected.log_probs) {
        assert!((a - b).abs() < TOLERANCE, "{a} vs {b}");
    }

    // The same prompt again reuses all but its last token.
    let again = score_prompt(network, &mut shared, &second, &set).expect("score again");
    assert_eq!(again.cached_tokens, second.len() - 1);
    for (a, b) in again.log_probs.iter().zip(&expected.log_probs) {
        assert!((a - b).abs() < TOLERANCE, "{a} vs {b}");
    }
}

/// A prompt run in pieces, as the prefix cache and label scoring run it, gives the hidden states
/// of one batch bit for bit. Before attention computed each row on its own, a general matrix
/// product chose its summation order from the batch shape, and the difference grew through
/// SmolLM2's 30 layers of 8-bit activations to 0.4 in the final hidden state.
#[test]
fn split_prompt_equals_one_batch() {
    let model = smollm();
    let network = model.network.as_ref();
    let tokens = encode(&model, "Review: The screen cracked on day one.\nSentiment: mixed feelings", true);
    let n = tokens.len();
    let mut cache = network.new_cache(n);
    let whole: Vec<Vec<f32>> = network.forward_hidden(&tokens, &mut cache).expect("forward").to_vec2().expect("rows");
    for split in [1, n / 2, n - 3, n - 1] {
        let mut cache = network.new_cache(n);
        let mut rows: Vec<Vec<f32>> =
            network.forward_hidden(&tokens[..split], &mut cache).expect("forward").to_vec2().expect("rows");
        rows.extend(network.forward_hidden(&tokens[split..], &mut cache).expect("forward").to_vec2::<f32>().expect("rows"));
        for (i, (row, expected)) in rows.iter().zip(&whole).enumerate() {
            assert!(row == expected, "split at {split}: row {i} differs");
        }
    }
}
