//! The tokenizer built from GGUF metadata against the models' reference `tokenizer.json` files.
//!
//! Needs the fetched models (`scripts/fetch-models.sh`): the Qwen2.5 and Gemma 3 GGUF files and
//! the reference tokenizers under `models/reference/`.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tierd::tokenizer::tokenizer_from_gguf;
use tokenizers::Tokenizer;

const SAMPLES: &[&str] = &[
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see 1,234,567 of them.",
    "机器学习是人工智能的一个分支。東京は日本の首都です。서울은 한국의 수도입니다.",
    "Emoji: 😀🚀👩‍👩‍👧‍👦 flags 🇭🇰🇫🇷 and ❤️ hearts",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() {\n\tlet x: Vec<u32> = (0..10).map(|i| i * i).collect();\n\tprintln!(\"{x:?}\");\n}",
    "spaces:   three,     five,          ten; tabs:\t\t\ttwo\n\n\nthree newlines\r\nCRLF",
    "   leading spaces and trailing spaces   ",
    "Café, naïve, coöperate, façade — “quotes” and ‘single’ … ellipsis",
    "Mixed中文and English混合text with numbers 12345 and symbols @#$%^&*()",
    "",
    " ",
    "\n",
    "a",
    "UPPER lower MiXeD 'S 'T 'RE 'VE 'M 'LL 'D",
    "https://example.com/path?query=value&other=1#fragment",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी",
];

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let content = Content::read(&mut file).expect("read GGUF metadata");
    tokenizer_from_gguf(&content).expect("build tokenizer").0
}

fn reference(name: &str) -> Tokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/reference")
        .join(name)
        .join("tokenizer.json");
    Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn model_path(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(relative)
}

fn compare(ours: &Tokenizer, reference: &Tokenizer, add_special: bool) {
    let mut failures = Vec::new();
    for text in SAMPLES {
        let expected = reference.encode_fast(*text, add_special).expect("reference encode");
        let actual = ours.encode_fast(*text, add_special).expect("encode");
        if expected.get_ids() != actual.get_ids() {
            failures.push(format!(
                "{text:?}\n  reference: {:?}\n  gguf:      {:?}",
                expected.get_ids(),
                actual.get_ids()
            ));
            continue;
        }
        let decoded = ours.decode(actual.get_ids(), true).expect("decode");
        let reference_decoded = reference.decode(expected.get_ids(), true).expect("decode");
        if decoded != reference_decoded {
            failures.push(format!("{text:?} decodes to {decoded:?}, reference {reference_decoded:?}"));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn qwen2_gguf_matches_reference() {
    let ours = gguf_tokenizer(&model_path(
        "qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ));
    compare(&ours, &reference("tokenizer-qwen3"), false);
}

#[test]
fn gemma3_gguf_matches_reference() {
    let ours = gguf_tokenizer(&model_path("gemma3-270m/gemma-3-270m-q4_k_m.gguf"));
    compare(&ours, &reference("tokenizer-gemma3"), true);
}

#[test]
fn chat_control_tokens_are_single_ids() {
    let ours = gguf_tokenizer(&model_path(
        "qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ));
    let encoding = ours
        .encode_fast("<|im_start|>user\nHi<|im_end|>", false)
        .expect("encode");
    assert_eq!(encoding.get_ids()[0], 151644, "<|im_start|>");
    assert_eq!(*encoding.get_ids().last().expect("ids"), 151645, "<|im_end|>");
}

#[test]
fn tokenizer_json_beside_model_overrides() {
    let folder = tempfile::tempdir().expect("temp dir");
    let model = folder.path().join("model.gguf");
    std::os::unix::fs::symlink(
        model_path("qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        &model,
    )
    .expect("link model");
    let reference_json = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference/tokenizer-qwen3/tokenizer.json");
    std::fs::copy(&reference_json, folder.path().join("tokenizer.json")).expect("copy tokenizer.json");

    let mut file = File::open(&model).expect("open model");
    let content = Content::read(&mut file).expect("read GGUF metadata");
    let (tokenizer, _) = tierd::tokenizer::load(&model, &content).expect("load tokenizer");

    // Qwen3's tokenizer.json has `<think>` (id 151667), which the Qwen2.5 GGUF lists as padding.
    assert_eq!(tokenizer.token_to_id("<think>"), Some(151667), "tokenizer.json was not used");
    let (from_gguf, _) = tokenizer_from_gguf(&content).expect("build tokenizer");
    assert_eq!(from_gguf.token_to_id("<think>"), None, "the GGUF vocabulary has no <think>");
}
