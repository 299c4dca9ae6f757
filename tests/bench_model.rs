//! `tierd bench model` on the real smollm2 model: the JSON report has one result per test with
//! one figure per repetition, and a label-scoring time, and bad arguments are rejected with the
//! value at fault.
//!
//! Run with `cargo test --release --test bench_model`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const SMOLLM: &str = "smollm2-135m-instruct";

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["bench", "model"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run tierd bench model")
}

#[test]
fn json_report_has_every_run() {
    let output = bench(&[
        "--model", SMOLLM, "--prompt-tokens", "16,32", "--decode-tokens", "8", "--repetitions", "2", "--threads", "2",
        "--format", "json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("report JSON");
    assert_eq!(report["threads"], 2);
    assert!(report["read_bandwidth"].as_f64() > Some(1e8), "{}", report["read_bandwidth"]);
    assert!(!report["machine"]["cpu"].as_str().unwrap_or_default().is_empty());

    let model = &report["models"][0];
    assert_eq!(model["model"], SMOLLM);
    let file = model["file"].as_str().expect("file");
    let size = std::fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).expect("model file").len();
    assert_eq!(model["file_bytes"].as_u64(), Some(size));
    assert!(model["peak_resident_bytes"].as_u64() >= model["resident_bytes"].as_u64());

    // Label scoring runs only the review past the cached instructions.
    let scoring = &model["label_scoring"];
    assert_eq!(scoring["runs"].as_array().map(Vec::len), Some(2), "{scoring}");
    assert!(scoring["milliseconds"].as_f64() > Some(0.0), "{scoring}");
    assert!(scoring["uncached_tokens"].as_u64() > Some(0), "{scoring}");
    assert!(scoring["uncached_tokens"].as_u64() < scoring["prompt_tokens"].as_u64(), "{scoring}");

    let tests = model["tests"].as_array().expect("tests");
    let names: Vec<&str> = tests.iter().filter_map(|t| t["test"].as_str()).collect();
    assert_eq!(names, ["pp16", "pp32", "tg8"]);
    for test in tests {
        let runs = test["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{test}");
        let mean = runs.iter().filter_map(Value::as_f64).sum::<f64>() / 2.0;
        assert!(mean > 0.0, "{test}");
        let reported = test["tokens_per_second"].as_f64().expect("tokens_per_second");
        assert!((reported - mean).abs() < 1e-9 * mean, "{test}");
    }
}

#[test]
fn csv_has_a_row_per_test() {
    let output = bench(&["--model", SMOLLM, "--prompt-tokens", "8", "--decode-tokens", "4", "--repetitions", "1", "--format", "csv"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("model,file_bytes,"), "{stdout}");
    assert!(lines[1].starts_with(&format!("{SMOLLM},")), "{stdout}");
    assert!(lines[1].contains(",pp8,"), "{stdout}");
    assert!(lines[2].contains(",tg4,"), "{stdout}");
}

#[test]
fn zero_decode_tokens_times_prefill_only() {
    let output = bench(&["--model", SMOLLM, "--prompt-tokens", "8", "--decode-tokens", "0", "--repetitions", "1", "--format", "json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("report JSON");
    let tests = report["models"][0]["tests"].as_array().expect("tests");
    let names: Vec<&str> = tests.iter().filter_map(|t| t["test"].as_str()).collect();
    assert_eq!(names, ["pp8"]);
}

#[test]
fn bad_arguments_name_the_value() {
    for (args, expected) in [
        (vec!["--model", "no-such-model"], "--model no-such-model: neither a configured model"),
        (vec!["--model", SMOLLM, "--prompt-tokens", "0"], "--prompt-tokens 0"),
        (vec!["--model", SMOLLM, "--prompt-tokens", "100000"], "exceed the model's context of 8192"),
        (vec!["--model", SMOLLM, "--threads", "0"], "--threads 0: the benchmark needs at least one thread"),
        (vec!["--model", SMOLLM, "--repetitions", "0"], "--repetitions 0"),
    ] {
        let output = bench(&args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
