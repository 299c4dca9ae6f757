//! The MiniLM sentence encoder against reference embeddings.
//!
//! `tests/golden/minilm.json` was written by `scripts/minilm_reference.py`, an independent
//! NumPy implementation of the BERT forward pass run in float64 on the same weights. It
//! reproduces the similarities that the sentence-transformers documentation publishes for
//! all-MiniLM-L6-v2 (0.6660, 0.1046, 0.1411 for its three example sentences).

use std::path::Path;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts};
use serde_json::Value;
use tierd::classify::encoder::{PassLimits, SentenceEncoder};
use tierd::classify::encoder_worker::{BatchHistograms, BatchSettings, EncoderWorker};

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

/// Starts a worker on the real encoder that waits up to `window` to fill a forward pass, with
/// histograms to read its batch sizes from.
fn worker(window: Duration) -> (EncoderWorker, BatchHistograms) {
    worker_with_queue(window, 16)
}

fn worker_with_queue(window: Duration, queue_capacity: usize) -> (EncoderWorker, BatchHistograms) {
    let histogram = |name: &str| Histogram::with_opts(HistogramOpts::new(name, "test")).expect("histogram");
    let histograms = BatchHistograms {
        requests: histogram("requests"),
        sequences: histogram("sequences"),
    };
    let settings = BatchSettings {
        queue_capacity,
        window,
        limits: PassLimits::default(),
    };
    let worker = EncoderWorker::spawn("test", encoder(), &settings, Some(histograms.clone())).expect("spawn worker");
    (worker, histograms)
}

/// Largest difference between two sets of embeddings of the same inputs.
fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "embedding count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

/// Difference allowed between an input embedded alone and in a padded batch. The padded
/// forward pass gives masked positions zero attention weight, but the matrix products run
/// over a wider sequence, which changes the order of float32 additions, so the values agree
/// to rounding and not bit for bit.
const BATCH_TOLERANCE: f32 = 1e-5;

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

#[test]
fn worker_merges_waiting_requests() {
    let (worker, histograms) = worker(Duration::from_millis(500));
    let requests: Vec<Vec<&str>> = vec![
        vec!["book a table for two tonight"],
        vec!["what's my account balance", "play some jazz in the kitchen please"],
        vec!["ok"],
        vec!["a much longer request that pads every other input of the batch to its own width", "hi"],
    ];
    let tokenized: Vec<Vec<Vec<u32>>> = requests
        .iter()
        .map(|texts| texts.iter().map(|t| worker.encoder.tokenize(t).expect("tokenize")).collect())
        .collect();
    // Six inputs do not fill a forward pass, so the worker waits out the window and the four
    // requests submitted meanwhile run together.
    let receivers: Vec<_> = tokenized
        .iter()
        .map(|inputs| worker.submit(inputs.clone()).expect("queue has room"))
        .collect();
    for ((receiver, inputs), texts) in receivers.into_iter().zip(&tokenized).zip(&requests) {
        let batched = receiver.blocking_recv().expect("a reply").expect("embeddings");
        let alone = worker.encoder.embed(inputs).expect("embed alone");
        let difference = largest_difference(&batched, &alone);
        assert!(difference <= BATCH_TOLERANCE, "{texts:?}: batched and alone differ by {difference}");
    }
    assert_eq!(histograms.requests.get_sample_count(), 1, "runs of the encoder");
    assert_eq!(histograms.requests.get_sample_sum(), 4.0, "requests in the run");
    assert_eq!(histograms.sequences.get_sample_count(), 1, "forward passes");
    assert_eq!(histograms.sequences.get_sample_sum(), 6.0, "sequences in the pass");
}

#[test]
fn worker_keeps_errors_per_request() {
    let (worker, histograms) = worker(Duration::from_millis(500));
    let good = |text: &str| vec![worker.encoder.tokenize(text).expect("tokenize")];
    let mut outside_vocabulary = good("transfer money to savings");
    outside_vocabulary[0][1] = worker.encoder.vocab_size as u32 + 5;
    let too_long = vec![vec![101; worker.encoder.max_tokens + 1]];
    let jobs = [
        good("what's the weather tomorrow"),
        outside_vocabulary,
        good("cancel my order"),
        too_long,
    ];
    let receivers: Vec<_> = jobs
        .iter()
        .map(|inputs| worker.submit(inputs.clone()).expect("queue has room"))
        .collect();
    let replies: Vec<_> = receivers
        .into_iter()
        .map(|receiver| receiver.blocking_recv().expect("a reply"))
        .collect();

    for index in [0, 2] {
        let embeddings = replies[index].as_ref().expect("the good request is embedded");
        let alone = worker.encoder.embed(&jobs[index]).expect("embed alone");
        let difference = largest_difference(embeddings, &alone);
        assert!(difference <= BATCH_TOLERANCE, "request {index} differs by {difference}");
    }
    let vocabulary_error = replies[1].as_ref().expect_err("an id outside the vocabulary").to_string();
    assert!(vocabulary_error.contains("outside the vocabulary"), "{vocabulary_error}");
    let length_error = replies[3].as_ref().expect_err("an input over the position limit").to_string();
    assert!(length_error.contains("at most 512"), "{length_error}");
    // The two bad requests get their errors before the run, so only the good ones are counted.
    assert_eq!(histograms.requests.get_sample_count(), 1, "runs of the encoder");
    assert_eq!(histograms.requests.get_sample_sum(), 2.0, "requests in the run");
}

#[test]
fn full_pass_skips_window() {
    let window = Duration::from_secs(5);
    let (worker, histograms) = worker(window);
    let inputs: Vec<Vec<u32>> = (0..PassLimits::default().max_sequences)
        .map(|i| worker.encoder.tokenize(&format!("review number {i} of the product")).expect("tokenize"))
        .collect();
    let started = Instant::now();
    let receiver = worker.submit(inputs).expect("queue has room");
    receiver.blocking_recv().expect("a reply").expect("embeddings");
    let elapsed = started.elapsed();
    assert!(elapsed < window, "a request that fills a pass waited {elapsed:?}");
    assert_eq!(histograms.sequences.get_sample_sum(), 32.0, "sequences in the pass");
}

#[test]
fn token_bound_splits_passes() {
    let encoder = encoder();
    let inputs: Vec<Vec<u32>> = ["short", "a somewhat longer sentence with more tokens in it", "mid length text", "ok"]
        .iter()
        .map(|t| encoder.tokenize(t).expect("tokenize"))
        .collect();
    let tight = PassLimits {
        max_sequences: 32,
        max_tokens: 12,
    };
    let split = encoder.embed_with(&inputs, tight).expect("embed in small passes");
    let whole = encoder.embed(&inputs).expect("embed in one pass");
    let difference = largest_difference(&split, &whole);
    assert!(difference <= BATCH_TOLERANCE, "split and whole passes differ by {difference}");
}

#[test]
fn full_queue_rejects_request() {
    let (worker, _) = worker_with_queue(Duration::ZERO, 1);
    // 256 inputs are as many as one run gathers, so the worker takes no other job with them.
    let busy: Vec<Vec<u32>> = (0..256)
        .map(|i| worker.encoder.tokenize(&format!("review {i}: it works, but the battery is weak")).expect("tokenize"))
        .collect();
    let one = vec![worker.encoder.tokenize("hello").expect("tokenize")];
    let first = worker.submit(busy).expect("the empty queue takes the first job");
    let started = Instant::now();
    while worker.queue_depth() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the worker never took the first job");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The worker is busy with the first job: the second waits in the queue of one, and the
    // third finds it full.
    let second = worker.submit(one.clone()).expect("the queue has room for one");
    let full = worker.submit(one).expect_err("the queue is full");
    assert_eq!(full.capacity, 1);
    assert_eq!(full.model, "test");
    first.blocking_recv().expect("a reply").expect("embeddings");
    second.blocking_recv().expect("a reply").expect("embeddings");
}
