//! Prometheus metrics, rendered in the text format by `GET /metrics`.
//!
//! Request, token, cost, latency and escalation figures are taken from each finished audit
//! record, so the counters and the audit trail count the same requests. Queue depths and the
//! audit writer's lag are gauges, and the prompt caches' counters are copied from the model
//! workers, all read when the metrics are scraped. Each encoder's worker fills its batch-size
//! histograms as it runs. `labels` bounds the label values that clients choose.

pub mod config;
pub mod labels;

use std::sync::Mutex;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::audit::{AuditRecord, WriterStats};
use crate::classify::encoder_worker::BatchHistograms;
use crate::engine::PromptCacheStats;
pub use config::MetricsConfig;
pub use labels::LabelBounds;

/// Content type of the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds: from a short classification to a long
/// generation or a slow provider.
const LATENCY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Upper bounds of the encoder batch-size buckets: requests per run, or sequences per forward
/// pass, up to the 256 inputs that one run gathers from waiting requests.
const BATCH_SIZE_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Labels of the request, token and cost counters.
const REQUEST_LABELS: [&str; 5] = ["tier", "provider", "model", "task", "workflow"];

/// Every metric that tierd exports.
pub struct Metrics {
    registry: Registry,
    labels: LabelBounds,
    requests: IntCounterVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    counterfactual: CounterVec,
    saving: GaugeVec,
    latency: HistogramVec,
    escalations: IntCounterVec,
    kept_local: IntCounterVec,
    budget_exceeded: IntCounterVec,
    unauthorized: IntCounterVec,
    generation_queue: IntGaugeVec,
    audit_queue: IntGauge,
    audit_lag: prometheus::Gauge,
    audit_records: IntCounterVec,
    encoder_batch_requests: HistogramVec,
    encoder_batch_sequences: HistogramVec,
    prompt_cache_lookups: IntCounterVec,
    prompt_cache_tokens: IntCounterVec,
    prompt_cache_evictions: IntCounterVec,
    prompt_cache_bytes: IntGaugeVec,
    /// Serializes scrapes, because copying the writer's totals into counters reads then adds.
    scrape: Mutex<()>,
}

/// Figures read from outside the metrics when they are scraped.
pub struct Snapshot<'a> {
    /// Requests waiting for each local model.
    pub generation_queues: Vec<(String, usize)>,
    /// The audit writer's counters; `None` when the audit trail is disabled.
    pub audit: Option<&'a WriterStats>,
    /// The prompt cache counters of each local model.
    pub prompt_caches: Vec<(String, &'a PromptCacheStats)>,
}

impl Metrics {
    pub fn new(labels: LabelBounds) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let money = |name: &str, help: &str| -> Result<CounterVec, prometheus::Error> {
            let metric = CounterVec::new(Opts::new(name, help), &REQUEST_LABELS)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let with_kind: Vec<&str> = std::iter::once("kind").chain(REQUEST_LABELS).collect();
        let with_status: Vec<&str> = ["endpoint", "status"].into_iter().chain(REQUEST_LABELS).collect();
        let with_reason: Vec<&str> = std::iter::once("reason").chain(REQUEST_LABELS).collect();

        let requests = counter(
            "tierd_requests_total",
            "Inference requests (chat, completions, classify) by the tier that answered them.",
            &with_status,
        )?;
        let tokens = counter("tierd_tokens_total", "Tokens of inference requests; kind is input or output.", &with_kind)?;
        let cost = money("tierd_cost_usd_total", "Cost of inference requests, in USD.")?;
        let counterfactual = money(
            "tierd_counterfactual_cost_usd_total",
            "Cost of the same tokens at the baseline frontier model, in USD.",
        )?;
        let saving = GaugeVec::new(
            Opts::new(
                "tierd_saving_usd",
                "Counterfactual cost minus cost, in USD; a gauge because a request priced above the baseline lowers it.",
            ),
            &REQUEST_LABELS,
        )?;
        registry.register(Box::new(saving.clone()))?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tierd_latency_seconds",
                "Latency of inference requests by phase: queue, prefill, decode, upstream or total.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase", "tier", "provider", "model", "task"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        let escalations = counter(
            "tierd_escalations_total",
            "Requests that left the local tier, by reason; tier, provider and model are where they went.",
            &with_reason,
        )?;
        let kept_local = counter(
            "tierd_kept_local_total",
            "Requests that would have escalated but were served locally, by reason.",
            &["reason", "task", "workflow"],
        )?;
        let budget_exceeded = counter(
            "tierd_context_budget_exceeded_total",
            "Prompts over their workflow's token budget; action is warn or reject.",
            &["workflow", "action"],
        )?;
        let unauthorized = counter(
            "tierd_unauthorized_total",
            "Requests rejected with 401; reason is missing or invalid key.",
            &["reason"],
        )?;
        let generation_queue = IntGaugeVec::new(
            Opts::new("tierd_generation_queue_depth", "Requests waiting for a local model's worker."),
            &["model"],
        )?;
        registry.register(Box::new(generation_queue.clone()))?;
        let audit_queue = IntGauge::new("tierd_audit_queue_depth", "Audit records queued but not yet written.")?;
        registry.register(Box::new(audit_queue.clone()))?;
        let audit_lag = prometheus::Gauge::new(
            "tierd_audit_writer_lag_seconds",
            "Age of the oldest audit record that the writer is writing; 0 when it is idle.",
        )?;
        registry.register(Box::new(audit_lag.clone()))?;
        let audit_records = counter(
            "tierd_audit_records_total",
            "Audit records by outcome: written, dropped (queue full) or failed (store error).",
            &["outcome"],
        )?;
        let batch_histogram = |name: &str, help: &str| -> Result<HistogramVec, prometheus::Error> {
            let metric = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BATCH_SIZE_BUCKETS.to_vec()),
                &["encoder"],
            )?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let encoder_batch_requests = batch_histogram(
            "tierd_encoder_batch_requests",
            "Classification requests embedded together in one run of a sentence encoder.",
        )?;
        let encoder_batch_sequences = batch_histogram(
            "tierd_encoder_batch_sequences",
            "Sequences in one forward pass of a sentence encoder.",
        )?;

        let prompt_cache_lookups = counter(
            "tierd_prompt_cache_lookups_total",
            "Generation requests that looked for a cached prompt prefix; result is hit or miss.",
            &["model", "result"],
        )?;
        let prompt_cache_tokens = counter(
            "tierd_prompt_cache_tokens_total",
            "Prompt tokens whose keys and values were reused from the prompt cache instead of computed.",
            &["model"],
        )?;
        let prompt_cache_evictions = counter(
            "tierd_prompt_cache_evictions_total",
            "Prompt cache entries dropped to stay within the model's byte budget.",
            &["model"],
        )?;
        let prompt_cache_bytes = IntGaugeVec::new(
            Opts::new("tierd_prompt_cache_bytes", "Bytes of keys and values held by a model's prompt cache."),
            &["model"],
        )?;
        registry.register(Box::new(prompt_cache_bytes.clone()))?;

        Ok(Self {
            registry,
            labels,
            requests,
            tokens,
            cost,
            counterfactual,
            saving,
            latency,
            escalations,
            kept_local,
            budget_exceeded,
            unauthorized,
            generation_queue,
            audit_queue,
            audit_lag,
            audit_records,
            encoder_batch_requests,
            encoder_batch_sequences,
            prompt_cache_lookups,
            prompt_cache_tokens,
            prompt_cache_evictions,
            prompt_cache_bytes,
            scrape: Mutex::new(()),
        })
    }

    /// Counts one finished request from its priced audit record.
    pub fn observe(&self, record: &AuditRecord) {
        let tier = record.tier.to_string();
        let provider = self.labels.provider(&record.provider);
        let model = self.labels.model(&record.model);
        let task = self.labels.task(record.task.as_deref());
        let workflow = self.labels.workflow(record.workflow.as_deref());
        let request = [tier.as_str(), provider, model, task, workflow];

        let status = record.status.to_string();
        let endpoint = endpoint_label(&record.endpoint);
        self.requests
            .with_label_values(&[&[endpoint, status.as_str()][..], &request].concat())
            .inc();
        for (kind, count) in [("input", record.input_tokens), ("output", record.output_tokens)] {
            self.tokens.with_label_values(&[&[kind][..], &request].concat()).inc_by(count);
        }
        // Prices are validated as finite and non-negative, so costs never lower a counter.
        self.cost.with_label_values(&request).inc_by(record.cost_usd.max(0.0));
        self.counterfactual
            .with_label_values(&request)
            .inc_by(record.counterfactual_usd.max(0.0));
        self.saving
            .with_label_values(&request)
            .add(record.counterfactual_usd - record.cost_usd);

        let phases = [
            ("queue", record.queue_ms),
            ("prefill", record.prefill_ms),
            ("decode", record.decode_ms),
            ("upstream", record.upstream_ms),
            ("total", Some(record.total_ms)),
        ];
        for (phase, ms) in phases {
            if let Some(ms) = ms {
                self.latency
                    .with_label_values(&[phase, tier.as_str(), provider, model, task])
                    .observe(ms / 1000.0);
            }
        }

        if let Some(reason) = &record.escalation {
            let reason = reason_label(reason);
            self.escalations.with_label_values(&[&[reason][..], &request].concat()).inc();
        }
        if let Some(reason) = &record.kept_local {
            self.kept_local
                .with_label_values(&[reason_label(reason), task, workflow])
                .inc();
        }
    }

    /// Returns the batch-size histograms of the encoder `encoder`, for its worker to fill.
    pub fn encoder_batches(&self, encoder: &str) -> BatchHistograms {
        let encoder = [self.labels.model(encoder)];
        BatchHistograms {
            requests: self.encoder_batch_requests.with_label_values(&encoder),
            sequences: self.encoder_batch_sequences.with_label_values(&encoder),
        }
    }

    /// Counts a prompt over its workflow's budget.
    pub fn budget_exceeded(&self, workflow: &str, action: &str) {
        let workflow = self.labels.workflow(Some(workflow));
        self.budget_exceeded.with_label_values(&[workflow, action]).inc();
    }

    /// Counts a request rejected for a `missing` or `invalid` key.
    pub fn unauthorized(&self, reason: &str) {
        self.unauthorized.with_label_values(&[reason]).inc();
    }

    /// Renders every metric in the Prometheus text format, after reading the gauges from
    /// `snapshot`.
    pub fn render(&self, snapshot: &Snapshot<'_>) -> Result<String, prometheus::Error> {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for (model, depth) in &snapshot.generation_queues {
            self.generation_queue
                .with_label_values(&[self.labels.model(model)])
                .set(i64::try_from(*depth).unwrap_or(i64::MAX));
        }
        if let Some(stats) = snapshot.audit {
            self.audit_queue.set(i64::try_from(stats.lag()).unwrap_or(i64::MAX));
            self.audit_lag.set(stats.oldest_unwritten_age().as_secs_f64());
            let totals = [
                ("written", stats.written.load(std::sync::atomic::Ordering::Relaxed)),
                ("dropped", stats.dropped_full.load(std::sync::atomic::Ordering::Relaxed)),
                ("failed", stats.failed.load(std::sync::atomic::Ordering::Relaxed)),
            ];
            for (outcome, total) in totals {
                let counter: IntCounter = self.audit_records.with_label_values(&[outcome]);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }

        for (model, stats) in &snapshot.prompt_caches {
            self.copy_prompt_cache(self.labels.model(model), stats);
        }

        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        String::from_utf8(text).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

impl Metrics {
    /// Sets the prompt cache metrics of `model` to the worker's totals. A model that a reload
    /// loads again starts a new worker from zero, which Prometheus reads as a counter reset.
    fn copy_prompt_cache(&self, model: &str, stats: &PromptCacheStats) {
        let read = |value: &std::sync::atomic::AtomicU64| value.load(std::sync::atomic::Ordering::Relaxed);
        let counters = [
            (self.prompt_cache_lookups.with_label_values(&[model, "hit"]), read(&stats.hits)),
            (self.prompt_cache_lookups.with_label_values(&[model, "miss"]), read(&stats.misses)),
            (self.prompt_cache_tokens.with_label_values(&[model]), read(&stats.cached_tokens)),
            (self.prompt_cache_evictions.with_label_values(&[model]), read(&stats.evictions)),
        ];
        for (counter, total) in counters {
            counter.reset();
            counter.inc_by(total);
        }
        self.prompt_cache_bytes
            .with_label_values(&[model])
            .set(i64::try_from(read(&stats.bytes)).unwrap_or(i64::MAX));
    }
}

/// Returns the endpoint label: one of the audited endpoints, or `other` for anything else,
/// which would be a bug.
fn endpoint_label(endpoint: &str) -> &str {
    match endpoint {
        "/v1/chat/completions" | "/v1/completions" | "/v1/classify" => endpoint,
        _ => labels::OTHER,
    }
}

/// Escalation and kept-local reasons are tierd's own names, all in `snake_case`; the check
/// keeps a future free-text reason from becoming a label.
fn reason_label(reason: &str) -> &str {
    if reason.len() <= 32 && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        reason
    } else {
        labels::OTHER
    }
}
