//! The MiniLM sentence encoder against reference embeddings.
//!
//! `tests/golden/minilm.json` was written by `scripts/minilm_reference.py`, an independent
//! NumPy implementation of the BERT forward pass run in float64 on the same weights. It
//! reproduces the similarities that the sentence-transformers documentation publishes for
//! all-MiniLM-L6-v2 (0.6660, 0.1046, 0.1411 for its three example sentences).

use std::path::Path;

use serde_json::Value;
use tierd::classify::encoder::SentenceEncoder;

/// Largest difference allowed per embedding value. tierd runs in float32 and the reference in
/// float64; the observed gap is far smaller, and a wrong GELU, pooling or mask moves values by
/// more than 1e-3.
const VALUE_TOLERANCE: f32 = 5e-5;

fn encoder() -> SentenceEncoder {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing; run scripts/fetch-models.sh",
        dir.display()
    );
    SentenceEncoder::load(&dir).expect("load the encoder")
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/minilm.json");
    let text = std::fs::read_to_string(&path).expect("read tests/golden/minilm.json");
    serde_json::from_str(&text).expect("parse tests/golden/minilm.json")
}

fn as_f32(values: &Value) -> Vec<f32> {
    values
        .as_array()
        .expect("an array of numbers")
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn token_ids_match_reference() {
    let encoder = encoder();
    for case in reference()["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let expected: Vec<u32> = case["token_ids"]
            .as_array()
            .expect("token_ids")
            .iter()
            .map(|v| v.as_u64().expect("an id") as u32)
            .collect();
        assert_eq!(encoder.tokenize(text).expect("tokenize"), expected, "text: {text}");
    }
}

#[test]
fn embeddings_match_reference() {
    let encoder = encoder();
    let reference = reference();
    let cases = reference["cases"].as_array().expect("cases");
    let inputs: Vec<Vec<u32>> = cases
        .iter()
        .map(|case| encoder.tokenize(case["text"].as_str().expect("text")).expect("tokenize"))
        .collect();
    // One padded batch of mixed lengths, so masking and pooling over padding are exercised.
    let embeddings = encoder.embed(&inputs).expect("embed");
    for (case, embedding) in cases.iter().zip(&embeddings) {
        let text = case["text"].as_str().expect("text");
        let expected = as_f32(&case["embedding"]);
        assert_eq!(embedding.len(), expected.len(), "dimension for {text}");
        let worst = embedding
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= VALUE_TOLERANCE, "{text}: largest difference {worst}");
        let norm = cosine(embedding, embedding).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text}: norm {norm}");
    }

    for pair in reference["similarities"].as_array().expect("similarities") {
        let first = pair["first"].as_u64().expect("first") as usize;
        let second = pair["second"].as_u64().expect("second") as usize;
        let expected = pair["cosine"].as_f64().expect("cosine") as f32;
        let actual = cosine(&embeddings[first], &embeddings[second]);
        assert!((actual - expected).abs() < 1e-4, "cosine {first}-{second}: {actual} vs {expected}");
    }
}

#[test]
fn batch_and_single_agree() {
    let encoder = encoder();
    let texts = ["short", "a somewhat longer sentence with more tokens in it", "mid length text"];
    let inputs: Vec<Vec<u32>> = texts.iter().map(|t| encoder.tokenize(t).expect("tokenize")).collect();
    let batched = encoder.embed(&inputs).expect("embed batch");
    for (input, expected) in inputs.iter().zip(&batched) {
        let single = encoder.embed(std::slice::from_ref(input)).expect("embed one");
        let worst = single[0]
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "padding changed an embedding by {worst}");
    }
}

#[test]
fn truncate_keeps_separator() {
    let encoder = encoder();
    let mut ids = encoder.tokenize("one two three four five six").expect("tokenize");
    let sep = *ids.last().expect("a token");
    SentenceEncoder::truncate(&mut ids, 4);
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[3], sep);
}
