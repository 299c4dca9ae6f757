//! `AuditHandle`: the audit record of one request while the request runs. The middleware
//! creates it, and the handler and any stream fill it in. The record is priced, counted in the
//! metrics and queued when the last clone is dropped, so a stream that outlives its handler is
//! recorded when it ends.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use super::config::StoreText;
use super::pricing::{Costs, PriceTable};
use super::record::AuditRecord;
use super::writer::AuditWriter;
use crate::metrics::Metrics;

/// Destination of finished records, shared by every request.
pub struct AuditSink {
    /// `None` when `[audit] enabled = false`: records then feed only the metrics.
    pub writer: Option<AuditWriter>,
    pub metrics: Arc<Metrics>,
    /// The prices of the policy in force; a reload swaps them.
    pub prices: ArcSwap<PriceTable>,
    pub store_text: StoreText,
}

struct Draft {
    sink: Arc<AuditSink>,
    started: Instant,
    record: Mutex<AuditRecord>,
}

impl Drop for Draft {
    fn drop(&mut self) {
        let mut record = std::mem::take(self.record.get_mut().unwrap_or_else(|p| p.into_inner()));
        record.total_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        // The audit middleware sets the status from the response. A status of 0 means the
        // client left and the request was dropped before it had a response.
        if record.status == 0 {
            record.status = crate::server::CLIENT_CLOSED;
            record
                .error
                .get_or_insert_with(|| "the client closed the connection before the response was sent".into());
        }
        let costs = self.sink.costs(&record);
        record.cost_usd = costs.cost_usd;
        record.counterfactual_usd = costs.counterfactual_usd;
        record.price_version = self.sink.prices.load().version.clone();
        self.sink.metrics.observe(&record);
        if let Some(writer) = &self.sink.writer {
            writer.record(record);
        }
    }
}

impl AuditSink {
    /// Prices `record`'s tokens. Escalations inside the request (classification) have already
    /// added their own cost to `record.cost_usd`.
    fn costs(&self, record: &AuditRecord) -> Costs {
        let costs = self
            .prices
            .load()
            .costs(&record.provider, &record.model, record.input_tokens, record.output_tokens);
        Costs {
            cost_usd: record.cost_usd + costs.cost_usd,
            counterfactual_usd: costs.counterfactual_usd,
        }
    }
}

/// A request's audit record in progress. Clones share it.
#[derive(Clone)]
pub struct AuditHandle(Arc<Draft>);

impl AuditHandle {
    pub fn new(sink: Arc<AuditSink>, record: AuditRecord) -> Self {
        Self(Arc::new(Draft {
            sink,
            started: Instant::now(),
            record: Mutex::new(record),
        }))
    }

    /// Returns the cost of the request from the record's current tokens, in USD.
    pub fn cost_usd(&self) -> f64 {
        let record = self.0.record.lock().unwrap_or_else(|p| p.into_inner());
        self.0.sink.costs(&record).cost_usd
    }

    /// Returns what `read` takes from the record.
    pub fn read<T>(&self, read: impl FnOnce(&AuditRecord) -> T) -> T {
        read(&self.0.record.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes the record.
    pub fn update(&self, change: impl FnOnce(&mut AuditRecord)) {
        change(&mut self.0.record.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn keep(&self, text: &str) -> Option<String> {
        match self.0.sink.store_text {
            StoreText::None => None,
            StoreText::Hash => Some(hex::encode(Sha256::digest(text.as_bytes()))),
            StoreText::Full => Some(text.to_string()),
        }
    }

    /// Keeps the prompt as the `[audit]` table's `store_text` sets.
    pub fn set_prompt(&self, text: &str) {
        let prompt = self.keep(text);
        self.update(|record| record.prompt = prompt);
    }

    /// Keeps the completion as the `[audit]` table's `store_text` sets.
    pub fn set_completion(&self, text: &str) {
        let completion = self.keep(text);
        self.update(|record| record.completion = completion);
    }
}
