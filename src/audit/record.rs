//! `AuditRecord`: one row of the audit trail, written for every request that tierd handles.

use serde::{Deserialize, Serialize};

/// Everything the audit trail keeps about one request. Costs are in USD.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The request id, as echoed in `X-Request-Id`.
    pub id: String,
    /// Arrival time, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Name of the client key that authenticated the request.
    pub client: Option<String>,
    /// Workflow tag, from the `X-Tierd-Workflow` header, the OpenAI `user` field or metadata.
    pub workflow: Option<String>,
    /// Path of the endpoint, such as `/v1/chat/completions`.
    pub endpoint: String,
    /// Classification task, for `/v1/classify`.
    pub task: Option<String>,
    /// Route named by the request, when it named one rather than a model.
    pub route: Option<String>,
    /// 3 for the local models, 2 for mid-range and 1 for frontier models.
    pub tier: u8,
    /// `local`, or the configured provider name.
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Price of the same tokens at the configured baseline frontier model.
    pub counterfactual_usd: f64,
    /// Version of the price table that `cost_usd` and `counterfactual_usd` were computed with.
    pub price_version: String,
    pub queue_ms: Option<f64>,
    pub prefill_ms: Option<f64>,
    pub decode_ms: Option<f64>,
    pub upstream_ms: Option<f64>,
    pub total_ms: f64,
    pub confidence: Option<f64>,
    /// Reason the request left the local tier (`low_confidence`, `pre_route`).
    pub escalation: Option<String>,
    /// Reason a request that would have escalated was served locally.
    pub kept_local: Option<String>,
    /// `warn` or `reject` when the prompt exceeded its workflow's token budget.
    pub over_budget: Option<String>,
    /// HTTP status of the response; a stream cut by the client is recorded with 499.
    pub status: u16,
    pub error: Option<String>,
    /// Prompt and completion text, or their SHA-256 hashes, only when the config enables them.
    pub prompt: Option<String>,
    pub completion: Option<String>,
}
