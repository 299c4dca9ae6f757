//! The record of how a chat request was served, reported in the `tierd` field of the
//! response body and in `X-Tierd-*` response headers.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::routing::gate::{Escalation, KeptLocal};

/// Provider name reported for completions of the local tier.
pub const LOCAL_PROVIDER: &str = "local";

#[derive(Debug, Clone, Serialize)]
pub struct Served {
    /// The route that the request named, when it named one rather than a model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// 3 for the local models, 2 for mid-range and 1 for frontier models.
    pub tier: u8,
    /// `local`, or the configured name of the provider that served the request.
    pub provider: String,
    /// The served model id, or the provider model's configured id.
    pub model: String,
    /// Confidence of the completion, when it was computed (for routed local completions).
    pub confidence: Option<f64>,
    /// Formula of `confidence`: `mean`, `min` or `margin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence_metric: Option<&'static str>,
    /// Confidence a local completion needed to be kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Reason the request left the local tier, or would have left it when `kept_local` is set.
    pub escalation: Option<Escalation>,
    /// Reason a request that would have escalated was served locally.
    pub kept_local: Option<KeptLocal>,
    /// Confidence of the local completion that the escalated one replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_confidence: Option<f64>,
    /// Pre-routing: the label the route task gave the request, and its confidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_confidence: Option<f64>,
    /// Kinds of personal data found in the request (`email`, `phone`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pii: Vec<&'static str>,
    /// Whether that personal data was replaced by placeholders before the request left.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
    /// Attempts at the provider that served the request, including the successful one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Providers tried before the one that served the request (all of them when none did),
    /// each with the reason it failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

impl Served {
    /// Creates the record of a completion by local model `model`, with nothing else known yet.
    pub fn local(model: &str) -> Self {
        Self {
            route: None,
            tier: 3,
            provider: LOCAL_PROVIDER.to_string(),
            model: model.to_string(),
            confidence: None,
            confidence_metric: None,
            threshold: None,
            escalation: None,
            kept_local: None,
            local_confidence: None,
            route_label: None,
            route_confidence: None,
            pii: Vec::new(),
            redacted: false,
            attempts: None,
            failed: Vec::new(),
        }
    }

    /// Writes the fields that fit a header as `X-Tierd-*` headers.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        };
        if let Some(route) = &self.route {
            set("x-tierd-route", route.clone());
        }
        set("x-tierd-tier", self.tier.to_string());
        set("x-tierd-provider", self.provider.clone());
        set("x-tierd-model", self.model.clone());
        if let Some(confidence) = self.confidence {
            set("x-tierd-confidence", format!("{confidence:.4}"));
        }
        if let Some(escalation) = self.escalation {
            set("x-tierd-escalation", escalation.as_str().to_string());
        }
        if let Some(kept) = self.kept_local {
            set("x-tierd-kept-local", kept.as_str().to_string());
        }
    }
}
