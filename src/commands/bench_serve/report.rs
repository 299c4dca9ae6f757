//! Result rows, one per endpoint and load level, their ratios against the first endpoint,
//! and the table printed from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::load::BatchResult;
use super::request::FailureKind;
use super::stats::Latency;
use crate::commands::machine::Machine;

/// A load level: an open-loop request rate or a closed-loop concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Requests per second.
    Rate(f64),
    Concurrency(usize),
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Level::Rate(rate) => write!(f, "{rate} req/s"),
            Level::Concurrency(concurrency) => write!(f, "concurrency {concurrency}"),
        }
    }
}

/// Failures of one kind in a row.
#[derive(Debug, Clone, Serialize)]
pub struct FailureCount {
    pub count: u64,
    /// The first failure's message.
    pub example: String,
}

/// Source of a row's output token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCount {
    /// From `usage.completion_tokens` of every stream.
    Usage,
    /// One token per content chunk, for servers that sent no usage; an estimate where a
    /// server puts several tokens in one chunk.
    ContentChunks,
    /// Usage where a stream had it, content chunks elsewhere.
    Mixed,
    /// The row has no successful chat request.
    None,
}

/// One request of a row, in the order the requests finished within each round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub ttft_ms: Option<f64>,
    /// End-to-end latency; `None` for a failed request.
    pub e2e_ms: Option<f64>,
    pub output_tokens: Option<u64>,
    /// Kind of the failure, such as `http 503`; `None` for a success.
    pub failure: Option<String>,
}

/// Results of one endpoint at one load level, over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Index of the endpoint, 0 for the first.
    pub endpoint: usize,
    pub url: String,
    pub level: Level,
    /// Requests sent; always `succeeded + failed`.
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures by kind: `http 503`, `connect`, `timeout`, `stream cut`, `error event`,
    /// `invalid response` or `request`.
    pub failures: BTreeMap<String, FailureCount>,
    /// Sum over the rounds of the time from the first send to the last response.
    pub wall_seconds: f64,
    /// Successful requests per second of `wall_seconds`.
    pub requests_per_second: f64,
    /// Output tokens of the successful requests per second of `wall_seconds`.
    pub output_tokens_per_second: f64,
    pub output_tokens: u64,
    pub output_tokens_counted_by: TokenCount,
    /// Mean `usage.prompt_tokens` of the streams that reported usage.
    pub mean_prompt_tokens: Option<f64>,
    /// Time to first token, in milliseconds.
    pub ttft_ms: Option<Latency>,
    /// Gaps between content chunks after the first, over all requests, in milliseconds.
    pub itl_ms: Option<Latency>,
    /// End-to-end latency of the successful requests, in milliseconds.
    pub e2e_ms: Option<Latency>,
    /// Successful streams that carried no content, and so no time to first token.
    pub empty_responses: u64,
    /// Maximum lag of a send behind its schedule, open loop only, in milliseconds.
    pub max_send_delay_ms: Option<f64>,
    pub samples: Vec<Sample>,
}

/// Outcomes of one endpoint at one level, gathered over the rounds.
#[derive(Debug, Default)]
pub struct RowBuilder {
    batches: Vec<BatchResult>,
}

impl RowBuilder {
    pub fn add(&mut self, batch: BatchResult) {
        self.batches.push(batch);
    }

    /// Gathers the outcomes into a row. `streamed` is true for chat streams, whose successful
    /// responses without content count as empty.
    pub fn build(self, endpoint: usize, url: &str, level: Level, streamed: bool) -> Row {
        let mut failures: BTreeMap<FailureKind, FailureCount> = BTreeMap::new();
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut sent, mut succeeded, mut output_tokens, mut empty) = (0u64, 0u64, 0u64, 0u64);
        let (mut from_usage, mut from_chunks) = (0u64, 0u64);
        let mut prompt_tokens = Vec::new();
        let mut samples = Vec::new();
        let mut wall = Duration::ZERO;
        let mut max_send_delay: Option<Duration> = None;

        for batch in self.batches {
            wall += batch.wall;
            if let Some(delay) = batch.max_send_delay {
                max_send_delay = Some(max_send_delay.map_or(delay, |max| max.max(delay)));
            }
            for outcome in batch.outcomes {
                sent += 1;
                match outcome {
                    Ok(measured) => {
                        samples.push(Sample {
                            ttft_ms: measured.ttft.map(milliseconds),
                            e2e_ms: Some(milliseconds(measured.e2e)),
                            output_tokens: Some(measured.output_tokens),
                            failure: None,
                        });
                        succeeded += 1;
                        e2e.push(measured.e2e);
                        match measured.ttft {
                            Some(first) => ttft.push(first),
                            None if streamed => empty += 1,
                            None => {}
                        }
                        itl.extend(measured.inter_token);
                        output_tokens += measured.output_tokens;
                        if measured.tokens_from_usage {
                            from_usage += 1;
                        } else if measured.ttft.is_some() {
                            from_chunks += 1;
                        }
                        prompt_tokens.extend(measured.prompt_tokens);
                    }
                    Err(failure) => {
                        samples.push(Sample {
                            ttft_ms: None,
                            e2e_ms: None,
                            output_tokens: None,
                            failure: Some(failure.kind.to_string()),
                        });
                        failures
                            .entry(failure.kind)
                            .and_modify(|entry| entry.count += 1)
                            .or_insert(FailureCount {
                                count: 1,
                                example: failure.message,
                            });
                    }
                }
            }
        }

        let seconds = wall.as_secs_f64();
        let per_second = |count: u64| if seconds > 0.0 { count as f64 / seconds } else { 0.0 };
        let output_tokens_counted_by = match (from_usage, from_chunks) {
            (0, 0) => TokenCount::None,
            (_, 0) => TokenCount::Usage,
            (0, _) => TokenCount::ContentChunks,
            _ => TokenCount::Mixed,
        };
        Row {
            endpoint,
            url: url.to_string(),
            level,
            sent,
            succeeded,
            failed: sent - succeeded,
            failures: failures.into_iter().map(|(kind, count)| (kind.to_string(), count)).collect(),
            wall_seconds: seconds,
            requests_per_second: per_second(succeeded),
            output_tokens_per_second: per_second(output_tokens),
            output_tokens,
            output_tokens_counted_by,
            mean_prompt_tokens: (!prompt_tokens.is_empty())
                .then(|| prompt_tokens.iter().sum::<u64>() as f64 / prompt_tokens.len() as f64),
            ttft_ms: Latency::of(&ttft),
            itl_ms: Latency::of(&itl),
            e2e_ms: Latency::of(&e2e),
            empty_responses: empty,
            max_send_delay_ms: max_send_delay.map(milliseconds),
            samples,
        }
    }
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One endpoint's figures at one level divided by the first endpoint's at the same level.
/// Below 1 means lower latency (faster) for the latency figures, and less throughput for the
/// per-second figures.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub endpoint: usize,
    pub url: String,
    pub level: Level,
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
    pub itl_p50: Option<f64>,
    pub e2e_p50: Option<f64>,
    pub e2e_p99: Option<f64>,
    pub output_tokens_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
}

/// Returns the ratios of every row of a later endpoint against the first endpoint's row at the
/// same level.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let divide = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    rows.iter()
        .filter(|row| row.endpoint > 0)
        .filter_map(|row| {
            let base = rows.iter().find(|other| other.endpoint == 0 && other.level == row.level)?;
            Some(Ratio {
                endpoint: row.endpoint,
                url: row.url.clone(),
                level: row.level,
                ttft_p50: divide(row.ttft_ms.map(|l| l.p50), base.ttft_ms.map(|l| l.p50)),
                ttft_p99: divide(row.ttft_ms.map(|l| l.p99), base.ttft_ms.map(|l| l.p99)),
                itl_p50: divide(row.itl_ms.map(|l| l.p50), base.itl_ms.map(|l| l.p50)),
                e2e_p50: divide(row.e2e_ms.map(|l| l.p50), base.e2e_ms.map(|l| l.p50)),
                e2e_p99: divide(row.e2e_ms.map(|l| l.p99), base.e2e_ms.map(|l| l.p99)),
                output_tokens_per_second: divide(Some(row.output_tokens_per_second), Some(base.output_tokens_per_second)),
                requests_per_second: divide(Some(row.requests_per_second), Some(base.requests_per_second)),
            })
        })
        .collect()
}

/// One endpoint as the report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointInfo {
    pub url: String,
    /// Full URL that requests went to.
    pub api_url: String,
    pub model: Option<String>,
}

/// Workload and load settings, for the report header.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// `chat` or `classify`.
    pub api: &'static str,
    /// The prompts file, or `synthetic`.
    pub prompts: String,
    pub distinct_prompts: usize,
    /// Requested prompt length of synthetic prompts, in tokens.
    pub prompt_tokens: Option<usize>,
    /// Measure of the synthetic prompt length: the tokenizer used, or an estimate.
    pub prompt_length: Option<String>,
    /// `--max-tokens`, when given.
    pub max_tokens: Option<u64>,
    /// `open loop` or `closed loop`.
    pub load: &'static str,
    /// Spacing of open-loop sends.
    pub arrivals: Option<super::schedule::Arrivals>,
    pub seed: u64,
    /// Maximum requests per endpoint and level, over all rounds.
    pub requests: usize,
    /// Maximum sending time per endpoint and level, over all rounds, in seconds.
    pub duration_seconds: f64,
    pub timeout_seconds: f64,
    pub rounds: usize,
    pub warmup_requests: usize,
}

/// The whole report, as `--format json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tierd_version: &'static str,
    /// The machine that ran the load generator.
    pub client_machine: Machine,
    pub setup: Setup,
    pub endpoints: Vec<EndpointInfo>,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

/// Formats `latency` as `p50/p90/p99`, in milliseconds.
fn percentiles(latency: Option<Latency>) -> String {
    match latency {
        Some(l) => format!("{}/{}/{}", short(l.p50), short(l.p90), short(l.p99)),
        None => "-".into(),
    }
}

/// Formats milliseconds with about three significant digits.
fn short(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

/// Renders the report as text tables.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let setup = &report.setup;
    for (index, endpoint) in report.endpoints.iter().enumerate() {
        let model = endpoint.model.as_deref().map(|m| format!(", model {m}")).unwrap_or_default();
        let _ = writeln!(out, "endpoint {}: {}{model}", index + 1, endpoint.api_url);
    }
    let prompts = match (&setup.prompt_tokens, &setup.prompt_length) {
        (Some(tokens), Some(length)) => format!("{} synthetic prompts of {tokens} tokens ({length})", setup.distinct_prompts),
        _ => format!("{} prompts from {}", setup.distinct_prompts, setup.prompts),
    };
    let max_tokens = setup.max_tokens.map(|m| format!(", max_tokens {m}")).unwrap_or_default();
    let _ = writeln!(out, "workload: {}, {prompts}{max_tokens}", setup.api);
    let arrivals = match setup.arrivals {
        Some(super::schedule::Arrivals::Poisson) => format!(", Poisson arrivals (seed {})", setup.seed),
        Some(super::schedule::Arrivals::Uniform) => ", evenly spaced sends".into(),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "load: {}{arrivals}; at most {} requests or {} s per endpoint and level, in {} round{}; timeout {} s; {} warm-up request{} per endpoint",
        setup.load,
        setup.requests,
        setup.duration_seconds,
        setup.rounds,
        if setup.rounds == 1 { "" } else { "s" },
        setup.timeout_seconds,
        setup.warmup_requests,
        if setup.warmup_requests == 1 { "" } else { "s" },
    );
    let _ = writeln!(out, "client: {} ({} logical CPUs)", report.client_machine.cpu, report.client_machine.logical_cpus);
    let _ = writeln!(out);

    let _ = writeln!(
        out,
        "{:<3} {:<17} {:>5} {:>5} {:>5} {:>7} {:>9} {:>20} {:>17} {:>20}",
        "ep", "level", "sent", "ok", "fail", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "e2e p50/p90/p99 ms"
    );
    for row in &report.rows {
        let _ = writeln!(
            out,
            "{:<3} {:<17} {:>5} {:>5} {:>5} {:>7.2} {:>9.1} {:>20} {:>17} {:>20}",
            row.endpoint + 1,
            row.level.to_string(),
            row.sent,
            row.succeeded,
            row.failed,
            row.requests_per_second,
            row.output_tokens_per_second,
            percentiles(row.ttft_ms),
            percentiles(row.itl_ms),
            percentiles(row.e2e_ms),
        );
    }

    let notes = row_notes(&report.rows);
    if !notes.is_empty() {
        let _ = writeln!(out);
        for note in notes {
            let _ = writeln!(out, "{note}");
        }
    }

    if !report.ratios.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "ratios against endpoint 1 (this endpoint / endpoint 1: under 1 is faster for latencies, slower for per-second figures):");
        let _ = writeln!(
            out,
            "{:<3} {:<17} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10} {:>7}",
            "ep", "level", "TTFT p50", "TTFT p99", "ITL p50", "e2e p50", "e2e p99", "out tok/s", "req/s"
        );
        for ratio_row in &report.ratios {
            let _ = writeln!(
                out,
                "{:<3} {:<17} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10} {:>7}",
                ratio_row.endpoint + 1,
                ratio_row.level.to_string(),
                ratio(ratio_row.ttft_p50),
                ratio(ratio_row.ttft_p99),
                ratio(ratio_row.itl_p50),
                ratio(ratio_row.e2e_p50),
                ratio(ratio_row.e2e_p99),
                ratio(ratio_row.output_tokens_per_second),
                ratio(ratio_row.requests_per_second),
            );
        }
    }
    out
}

/// Lines under the table: failures by kind, token counting that is not from usage, empty
/// streams, and a load generator that fell behind its schedule.
fn row_notes(rows: &[Row]) -> Vec<String> {
    let mut notes = Vec::new();
    for row in rows {
        let at = format!("endpoint {} at {}", row.endpoint + 1, row.level);
        for (kind, failure) in &row.failures {
            notes.push(format!("{at}: {} × {kind}, first: {}", failure.count, failure.example));
        }
        match row.output_tokens_counted_by {
            TokenCount::ContentChunks => notes.push(format!("{at}: no usage in the streams, so output tokens are content chunks")),
            TokenCount::Mixed => notes.push(format!("{at}: some streams had no usage; their output tokens are content chunks")),
            TokenCount::Usage | TokenCount::None => {}
        }
        if row.empty_responses > 0 {
            notes.push(format!("{at}: {} successful streams carried no content and have no TTFT", row.empty_responses));
        }
        // A send more than 10 ms late shifts the arrival process noticeably at these rates.
        if let Some(delay) = row.max_send_delay_ms.filter(|delay| *delay > 10.0) {
            notes.push(format!("{at}: a send ran {delay:.0} ms behind its schedule; the load generator may be short of CPU"));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::bench_serve::request::Failure;
    use crate::commands::bench_serve::stream::Measured;

    fn measured(ttft_ms: u64, e2e_ms: u64, tokens: u64, usage: bool) -> Measured {
        Measured {
            ttft: Some(Duration::from_millis(ttft_ms)),
            inter_token: vec![Duration::from_millis(5); tokens.saturating_sub(1) as usize],
            e2e: Duration::from_millis(e2e_ms),
            output_tokens: tokens,
            tokens_from_usage: usage,
            prompt_tokens: usage.then_some(10),
        }
    }

    fn row(endpoint: usize, outcomes: Vec<Result<Measured, Failure>>) -> Row {
        let mut builder = RowBuilder::default();
        builder.add(BatchResult {
            outcomes,
            wall: Duration::from_secs(2),
            max_send_delay: Some(Duration::from_millis(1)),
        });
        builder.build(endpoint, "http://127.0.0.1:1", Level::Rate(1.0), true)
    }

    #[test]
    fn row_counts_and_rates() {
        let failure = |kind, message: &str| Failure {
            kind,
            message: message.into(),
        };
        let built = row(
            0,
            vec![
                Ok(measured(10, 100, 4, true)),
                Ok(measured(20, 200, 6, false)),
                Err(failure(FailureKind::Status(503), "busy")),
                Err(failure(FailureKind::Status(503), "still busy")),
                Err(failure(FailureKind::Timeout, "slow")),
            ],
        );

        assert_eq!(built.sent, 5);
        assert_eq!(built.succeeded, 2);
        assert_eq!(built.failed, 3);
        assert_eq!(built.failures["http 503"].count, 2);
        assert_eq!(built.failures["http 503"].example, "busy");
        assert_eq!(built.failures["timeout"].count, 1);

        assert_eq!(built.output_tokens, 10);
        assert!((built.output_tokens_per_second - 5.0).abs() < 1e-9);
        assert!((built.requests_per_second - 1.0).abs() < 1e-9);
        assert_eq!(built.output_tokens_counted_by, TokenCount::Mixed);
        assert_eq!(built.mean_prompt_tokens, Some(10.0));

        assert_eq!(built.ttft_ms.map(|l| l.count), Some(2));
        assert_eq!(built.itl_ms.map(|l| l.count), Some(8));
        assert_eq!(built.samples.len(), 5);
        assert_eq!(built.samples[1].ttft_ms, Some(20.0));
        assert_eq!(built.samples[4].failure.as_deref(), Some("timeout"));
    }

    #[test]
    fn ratios_pair_rows_of_the_same_level() {
        let base = row(0, vec![Ok(measured(10, 100, 4, true))]);
        let other = row(1, vec![Ok(measured(20, 50, 4, true)), Ok(measured(20, 50, 4, true))]);
        let computed = ratios(&[base, other]);
        assert_eq!(computed.len(), 1);
        let first = &computed[0];
        assert_eq!(first.endpoint, 1);
        assert!((first.ttft_p50.expect("both have TTFT") - 2.0).abs() < 1e-9);
        assert!((first.e2e_p50.expect("both have e2e") - 0.5).abs() < 1e-9);
        assert!((first.output_tokens_per_second.expect("both have tokens") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn failed_only_row_has_no_latency() {
        let built = row(
            0,
            vec![Err(Failure {
                kind: FailureKind::Connect,
                message: "refused".into(),
            })],
        );
        assert_eq!(built.sent, 1);
        assert_eq!(built.failed, 1);
        assert!(built.e2e_ms.is_none());
        assert!(built.ttft_ms.is_none());
        assert_eq!(built.output_tokens_counted_by, TokenCount::None);
        let text = table(&Report {
            tierd_version: "test",
            client_machine: Machine::describe(),
            setup: Setup {
                api: "chat",
                prompts: "synthetic".into(),
                distinct_prompts: 1,
                prompt_tokens: Some(8),
                prompt_length: Some("approximate".into()),
                max_tokens: Some(4),
                load: "open loop",
                arrivals: Some(super::super::schedule::Arrivals::Poisson),
                seed: 0,
                requests: 1,
                duration_seconds: 1.0,
                timeout_seconds: 1.0,
                rounds: 1,
                warmup_requests: 0,
            },
            endpoints: vec![],
            rows: vec![built],
            ratios: vec![],
        });
        assert!(text.contains("1 × connect, first: refused"), "{text}");
    }
}
