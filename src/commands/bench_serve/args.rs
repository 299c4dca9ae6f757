//! Command-line arguments of `tierd bench serve`.

use std::path::PathBuf;
use std::time::Duration;

use super::schedule::Arrivals;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct BenchServeArgs {
    /// Base URL of the server; `/v1/chat/completions` (or `/v1/classify`) is appended, and a
    /// URL ending in `/v1` gets only the part after it.
    #[arg(long, default_value = "http://127.0.0.1:8080", conflicts_with = "compare")]
    pub url: String,
    /// Run the same workload against each of these base URLs in alternating rounds, and
    /// report ratios against the first.
    #[arg(long, num_args = 2.., value_name = "URL")]
    pub compare: Vec<String>,
    /// Model named in chat requests, in place of any model in --prompts: once for every
    /// endpoint, or once per --compare URL in order.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Bearer token sent with every request.
    #[arg(long, env = "TIERD_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Comma-separated open-loop request rates, in requests per second: requests are sent on
    /// schedule whatever is still outstanding. One result row per endpoint and rate.
    #[arg(long = "rate", value_delimiter = ',', conflicts_with = "concurrency")]
    pub rates: Vec<f64>,
    /// Comma-separated closed-loop concurrencies: each keeps this many requests in flight
    /// [default without --rate: 1].
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Spacing of open-loop sends: Poisson arrivals from --seed, or evenly spaced.
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrivals: Arrivals,
    /// Seed of the Poisson arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum requests per endpoint and level.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Maximum sending time per endpoint and level, such as 60s or 2m; requests in flight
    /// then run to their end or their timeout.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time a request may take, response included, before it counts as a timeout.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Rounds each level's requests are split into, the endpoints taking turns
    /// [default: 1, or 3 with --compare].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Requests sent to each endpoint before measuring, and not counted; a failed one stops
    /// the run.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// JSONL file of chat requests (objects with `messages`) or classification inputs
    /// (objects with `input`, or `text` as in labelled data); cycled through in order.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Length of synthetic prompts, in tokens; exact with --tokenizer (or a --model that
    /// names a local model), else estimated.
    #[arg(long, default_value_t = 128, conflicts_with = "prompts")]
    pub prompt_tokens: usize,
    /// max_tokens of every chat request [default: each request's own, else 128].
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Send classifications of this task to `/v1/classify` instead of chat requests; with
    /// --prompts of classification inputs, the task of every line.
    #[arg(long)]
    pub task: Option<String>,
    /// A configured model id or a GGUF file whose tokenizer measures synthetic prompts.
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// PNG file of p50, p90 and p99 of time to first token and end-to-end latency against
    /// request rate, one colour per endpoint.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Accept endpoints outside the loopback range (127.0.0.0/8, ::1, localhost).
    #[arg(long)]
    pub allow_remote: bool,
}

impl BenchServeArgs {
    /// Returns the endpoints' base URLs in order: the `--compare` URLs, or else `--url`.
    pub fn urls(&self) -> &[String] {
        if self.compare.is_empty() {
            std::slice::from_ref(&self.url)
        } else {
            &self.compare
        }
    }
}
