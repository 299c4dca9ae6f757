//! `tierd bench model`: engine speed on this machine, in the manner of llama.cpp's
//! `llama-bench`. For each model it times prefill of prompts of given lengths and decode of a
//! given number of tokens, over several repetitions. The report gives the mean and standard
//! deviation in tokens per second, the load time, resident memory, the machine and the memory
//! bandwidth limit.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

use super::machine::{read_bandwidth, resident_memory, Machine};
use crate::classify::label_scoring::{score_prompt, LabelSet, PrefixCache};
use crate::config::Config;
use crate::model::LoadedModel;
use crate::registry::model_file;

pub struct BenchModelArgs {
    /// Configured model ids or paths of GGUF files; empty means every configured model.
    pub models: Vec<String>,
    pub prompt_tokens: Vec<usize>,
    pub decode_tokens: usize,
    pub threads: usize,
    pub repetitions: usize,
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub threads: usize,
    pub repetitions: usize,
    /// Memory read bandwidth with `threads` threads, in bytes per second.
    pub read_bandwidth: f64,
    pub tierd_version: &'static str,
    pub models: Vec<ModelBench>,
}

#[derive(Debug, Serialize)]
pub struct ModelBench {
    pub model: String,
    pub file: String,
    pub file_bytes: u64,
    pub load_seconds: f64,
    /// Resident memory of the process after the model loaded, in bytes.
    pub resident_bytes: Option<u64>,
    /// Peak resident memory of the process so far, in bytes. Models run one after another, so
    /// this is the largest model's peak once a larger one has run.
    pub peak_resident_bytes: Option<u64>,
    pub tests: Vec<TestResult>,
    /// Time of one sentiment classification by label scoring, in milliseconds, with the
    /// instructions cached as for consecutive requests of one task.
    pub label_scoring: ScoringResult,
    /// Estimated fastest decode: `read_bandwidth` over the file size, because each decoded
    /// token reads every weight matrix once. It holds for models whose output layer shares the
    /// token embedding (all three default models); others read less per token.
    pub decode_bandwidth_limit: f64,
}

#[derive(Debug, Serialize)]
pub struct TestResult {
    /// `pp512` for a 512-token prefill, `tg128` for 128 decoded tokens, as llama-bench names them.
    pub test: String,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub standard_deviation: f64,
    /// Tokens per second of each repetition.
    pub runs: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ScoringResult {
    /// Prompt tokens of a classification, instructions included.
    pub prompt_tokens: usize,
    /// Tokens each classification runs past the cached instructions.
    pub uncached_tokens: usize,
    pub milliseconds: f64,
    pub standard_deviation: f64,
    /// Milliseconds of each repetition.
    pub runs: Vec<f64>,
}

/// Few-shot instructions of the label-scoring test, shared by every classification.
const INSTRUCTIONS: &str = "Label the sentiment of each review as positive or negative.\n\n\
    Review: Great value and it works perfectly.\nSentiment: positive\n\n\
    Review: It stopped working after a week.\nSentiment: negative\n\n";
/// Two inputs used in turn, so that the instructions stay cached and the review never is.
const REVIEWS: [&str; 2] = [
    "Review: The battery lasts two days and the screen is bright and sharp.\nSentiment:",
    "Review: Shipping took a month and the box arrived crushed.\nSentiment:",
];

pub fn run(config: &Config, args: &BenchModelArgs) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads 0: the benchmark needs at least one thread");
    }
    if args.repetitions == 0 {
        bail!("--repetitions 0: the benchmark needs at least one repetition");
    }
    if let Some(zero) = args.prompt_tokens.iter().find(|&&p| p == 0) {
        bail!("--prompt-tokens {zero}: a prompt needs at least one token");
    }
    let files = model_files(config, &args.models)?;
    // candle's matmuls size their thread pools from RAYON_NUM_THREADS, and tierd's kernels run
    // on rayon's global pool, so both are set before any work starts.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .context("failed to start the thread pool")?;

    let mut models = Vec::with_capacity(files.len());
    for (id, path) in files {
        eprintln!("{id}: loading {}", path.display());
        models.push(bench_one(&id, &path, args)?);
    }
    // Measured after the models, so that its buffer does not count in their peak memory.
    let read_bandwidth = read_bandwidth(3);
    for model in &mut models {
        model.decode_bandwidth_limit = read_bandwidth / model.file_bytes.max(1) as f64;
    }
    let report = BenchReport {
        machine: Machine::describe(),
        threads: args.threads,
        repetitions: args.repetitions,
        read_bandwidth,
        tierd_version: env!("CARGO_PKG_VERSION"),
        models,
    };
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Csv => print_csv(&report),
        OutputFormat::Table => print_table(&report),
    }
    Ok(())
}

/// Resolves `--model` values: a configured model id, or a path to a GGUF file.
fn model_files(config: &Config, requested: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let configured = config.resolved_models()?;
    if requested.is_empty() {
        return configured
            .iter()
            .map(|model| Ok((model.id.clone(), model_file(model)?)))
            .collect();
    }
    requested
        .iter()
        .map(|name| {
            if let Some(model) = configured.iter().find(|m| &m.id == name) {
                return Ok((model.id.clone(), model_file(model)?));
            }
            let path = PathBuf::from(name);
            if path.is_file() {
                let id = path.file_stem().map_or(name.clone(), |stem| stem.to_string_lossy().into_owned());
                return Ok((id, path));
            }
            let ids: Vec<&str> = configured.iter().map(|m| m.id.as_str()).collect();
            bail!(
                "--model {name}: neither a configured model ({}) nor a GGUF file",
                ids.join(", ")
            )
        })
        .collect()
}

fn bench_one(id: &str, path: &std::path::Path, args: &BenchModelArgs) -> anyhow::Result<ModelBench> {
    let model = LoadedModel::load(path).with_context(|| format!("failed to load {}", path.display()))?;
    let memory_after_load = resident_memory();
    let context = model.network.hparams().context_length;
    let longest = args.prompt_tokens.iter().copied().max().unwrap_or(0).max(args.decode_tokens);
    if longest > context {
        bail!("{id}: {longest} tokens exceed the model's context of {context}");
    }
    let tokens = prompt_tokens(&model, longest)?;

    // One untimed pass of each kind fills caches and faults the weights in, as llama-bench's
    // warm-up run does.
    let mut cache = model.network.new_cache(16);
    model.network.forward(&tokens[..8.min(tokens.len())], &mut cache)?;

    let mut tests = Vec::new();
    for &prompt in &args.prompt_tokens {
        let mut runs = Vec::with_capacity(args.repetitions);
        for _ in 0..args.repetitions {
            let mut cache = model.network.new_cache(prompt);
            let started = Instant::now();
            model.network.forward(&tokens[..prompt], &mut cache)?;
            runs.push(prompt as f64 / started.elapsed().as_secs_f64());
        }
        tests.push(TestResult::new(format!("pp{prompt}"), prompt, runs));
        eprintln!("{id}: pp{prompt} done");
    }
    // `--decode-tokens 0` times prefill only, as llama-bench's `-n 0` does.
    if args.decode_tokens > 0 {
        let mut runs = Vec::with_capacity(args.repetitions);
        for _ in 0..args.repetitions {
            let mut cache = model.network.new_cache(args.decode_tokens);
            let started = Instant::now();
            for &token in &tokens[..args.decode_tokens] {
                model.network.forward(&[token], &mut cache)?;
            }
            runs.push(args.decode_tokens as f64 / started.elapsed().as_secs_f64());
        }
        tests.push(TestResult::new(format!("tg{}", args.decode_tokens), args.decode_tokens, runs));
        eprintln!("{id}: tg{} done", args.decode_tokens);
    }

    let label_scoring = time_label_scoring(&model, args.repetitions)?;
    eprintln!("{id}: label scoring done");

    Ok(ModelBench {
        model: id.to_string(),
        file: path.display().to_string(),
        file_bytes: model.file_size,
        load_seconds: model.load_time.as_secs_f64(),
        resident_bytes: memory_after_load.map(|(now, _)| now),
        peak_resident_bytes: resident_memory().map(|(_, peak)| peak),
        tests,
        label_scoring,
        decode_bandwidth_limit: 0.0,
    })
}

/// Times classifications by label scoring, the way a task's `llm_labels` backend runs them:
/// the reviews in turn through one prefix cache, scoring the labels ` positive` and ` negative`.
fn time_label_scoring(model: &LoadedModel, repetitions: usize) -> anyhow::Result<ScoringResult> {
    let encode = |text: &str, bos: bool| -> anyhow::Result<Vec<u32>> {
        let encoding = model
            .tokenizer
            .encode_fast(text, bos)
            .map_err(|e| anyhow::anyhow!("failed to tokenize the label-scoring prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    };
    let prompts = [
        encode(&format!("{INSTRUCTIONS}{}", REVIEWS[0]), true)?,
        encode(&format!("{INSTRUCTIONS}{}", REVIEWS[1]), true)?,
    ];
    let labels = vec![encode(" positive", false)?, encode(" negative", false)?];

    let longest_label = labels.iter().map(Vec::len).max().unwrap_or(1);
    let set = LabelSet::new(labels, 0)?;
    let network = model.network.as_ref();
    let capacity = prompts[0].len().max(prompts[1].len()) + longest_label + 1;
    let mut prefix = PrefixCache::new(network, capacity);
    // The first classification fills the cache with the instructions.
    score_prompt(network, &mut prefix, &prompts[1], &set)?;

    let mut runs = Vec::with_capacity(repetitions);
    for repetition in 0..repetitions {
        let started = Instant::now();
        score_prompt(network, &mut prefix, &prompts[repetition % 2], &set)?;
        runs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let shared = prompts[0].iter().zip(&prompts[1]).take_while(|(a, b)| a == b).count();
    let (milliseconds, standard_deviation) = mean_and_deviation(&runs);
    Ok(ScoringResult {
        prompt_tokens: prompts[0].len(),
        uncached_tokens: prompts[0].len() - shared,
        milliseconds,
        standard_deviation,
        runs,
    })
}

/// Returns the mean and the sample standard deviation (0 for one value).
fn mean_and_deviation(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let variance = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64
    } else {
        0.0
    };
    (mean, variance.sqrt())
}

/// Returns `count` tokens of real English text, repeated when the text is shorter.
fn prompt_tokens(model: &LoadedModel, count: usize) -> anyhow::Result<Vec<u32>> {
    const TEXT: &str = include_str!("../../tests/golden/prompts/long.txt");
    let encoding = model
        .tokenizer
        .encode_fast(TEXT, false)
        .map_err(|e| anyhow::anyhow!("failed to tokenize the benchmark prompt: {e}"))?;
    let ids = encoding.get_ids();
    if ids.is_empty() {
        bail!("the benchmark prompt tokenized to nothing");
    }
    Ok(ids.iter().copied().cycle().take(count).collect())
}

impl TestResult {
    fn new(test: String, tokens: usize, runs: Vec<f64>) -> Self {
        let (mean, standard_deviation) = mean_and_deviation(&runs);
        Self {
            test,
            tokens,
            tokens_per_second: mean,
            standard_deviation,
            runs,
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn print_table(report: &BenchReport) {
    let machine = &report.machine;
    println!("cpu: {} ({} logical CPUs)", machine.cpu, machine.logical_cpus);
    println!("simd compiled in: {}", machine.compiled_simd.join(" "));
    println!("simd on this cpu: {}", machine.cpu_simd.join(" "));
    println!(
        "threads {}, repetitions {}, memory read bandwidth {:.1} GB/s, tierd {}",
        report.threads,
        report.repetitions,
        report.read_bandwidth / 1e9,
        report.tierd_version
    );

    println!();
    println!(
        "{:<32} {:>9} {:>8} {:>9} {:>8} {:>18} {:>11}",
        "model", "size MiB", "load s", "peak MiB", "test", "tokens/s", "of limit"
    );
    for model in &report.models {
        for test in &model.tests {
            let share = if test.test.starts_with("tg") {
                format!("{:.0} %", 100.0 * test.tokens_per_second / model.decode_bandwidth_limit)
            } else {
                String::new()
            };
            println!(
                "{:<32} {:>9.0} {:>8.2} {:>9} {:>8} {:>18} {:>11}",
                model.model,
                model.file_bytes as f64 / MIB,
                model.load_seconds,
                model.peak_resident_bytes.map_or("-".into(), |b| format!("{:.0}", b as f64 / MIB)),
                test.test,
                format!("{:.2} ± {:.2}", test.tokens_per_second, test.standard_deviation),
                share
            );
        }
    }

    println!();
    println!("label scoring, one sentiment classification with its instructions cached:");
    for model in &report.models {
        let scoring = &model.label_scoring;
        println!(
            "{:<32} {:>8.2} ± {:.2} ms ({} prompt tokens, {} past the cache)",
            model.model, scoring.milliseconds, scoring.standard_deviation, scoring.prompt_tokens, scoring.uncached_tokens
        );
    }
    println!();
    println!("of limit: decode speed as a share of read bandwidth / file size, the most decode can reach");
}

fn print_csv(report: &BenchReport) {
    println!("model,file_bytes,load_seconds,peak_resident_bytes,threads,test,tokens,tokens_per_second,standard_deviation,decode_bandwidth_limit,label_scoring_ms,cpu");
    for model in &report.models {
        for test in &model.tests {
            println!(
                "{},{},{:.3},{},{},{},{},{:.3},{:.3},{:.3},{:.3},\"{}\"",
                model.model,
                model.file_bytes,
                model.load_seconds,
                model.peak_resident_bytes.map_or(String::new(), |b| b.to_string()),
                report.threads,
                test.test,
                test.tokens,
                test.tokens_per_second,
                test.standard_deviation,
                model.decode_bandwidth_limit,
                model.label_scoring.milliseconds,
                report.machine.cpu.replace('"', "\"\"")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_reports_mean_and_sample_deviation() {
        let result = TestResult::new("tg4".into(), 4, vec![10.0, 12.0, 14.0]);
        assert_eq!(result.tokens_per_second, 12.0);
        assert_eq!(result.standard_deviation, 2.0);
        assert_eq!(TestResult::new("tg4".into(), 4, vec![10.0]).standard_deviation, 0.0);
    }
}
