//! The gate every escalation passes: the request's sensitivity, personal data, maximum tier
//! and latency budget decide whether it may leave the box, and to which models.

use std::time::Duration;

use serde::Serialize;

use super::config::{ModelRef, PiiPolicy};
use super::criteria::{Criteria, Sensitivity};
use super::upstreams::Upstreams;

/// Reason a request left the local tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Escalation {
    /// The local answer's confidence was below the threshold.
    LowConfidence,
    /// The route task sent the request to a remote tier before any local completion.
    PreRoute,
    /// The local model could not take the request: its queue was full or the prompt did not
    /// fit its context.
    LocalUnavailable,
}

impl Escalation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowConfidence => "low_confidence",
            Self::PreRoute => "pre_route",
            Self::LocalUnavailable => "local_unavailable",
        }
    }
}

/// Reason a request that would have escalated was served locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeptLocal {
    /// The client marked the request restricted.
    Restricted,
    /// The PII detector found personal data, and the policy keeps such requests local.
    Pii,
    /// The request's maximum tier excludes every configured remote model.
    MaxTier,
    /// The expected remote response time does not fit in the rest of the latency budget.
    LatencyBudget,
    /// No remote model is configured for the route or task.
    NoProvider,
    /// Every provider of the chain failed.
    ProvidersFailed,
}

impl KeptLocal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Pii => "pii",
            Self::MaxTier => "max_tier",
            Self::LatencyBudget => "latency_budget",
            Self::NoProvider => "no_provider",
            Self::ProvidersFailed => "providers_failed",
        }
    }
}

/// A remote model that may serve the request, with its tier.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub model: ModelRef,
    pub tier: u8,
}

/// Permission to escalate.
#[derive(Debug, Clone)]
pub struct Cleared {
    /// The chain to send to, in fallback order, limited to the tiers the request allows.
    pub models: Vec<ModelRef>,
    /// Whether personal data must be replaced by placeholders before sending.
    pub redact: bool,
    /// Time left of the request's latency budget, which bounds the remote call.
    pub remaining: Option<Duration>,
}

/// Decides whether a request may escalate to `candidates`, given what was found in its text.
/// `elapsed` is the time since the request arrived.
pub fn clear(
    criteria: &Criteria,
    candidates: &[Candidate],
    contains_pii: bool,
    pii_policy: PiiPolicy,
    upstreams: &Upstreams,
    elapsed: Duration,
) -> Result<Cleared, KeptLocal> {
    if criteria.sensitivity == Sensitivity::Restricted {
        return Err(KeptLocal::Restricted);
    }
    if candidates.is_empty() {
        return Err(KeptLocal::NoProvider);
    }
    let models: Vec<ModelRef> = candidates
        .iter()
        .filter(|candidate| criteria.allows_tier(candidate.tier))
        .map(|candidate| candidate.model.clone())
        .collect();
    if models.is_empty() {
        return Err(KeptLocal::MaxTier);
    }
    let redact = match (contains_pii, pii_policy) {
        (false, _) => false,
        (true, PiiPolicy::Local) => return Err(KeptLocal::Pii),
        (true, PiiPolicy::Redact) => true,
    };
    let remaining = match criteria.latency_budget {
        None => None,
        Some(budget) => {
            let remaining = budget.saturating_sub(elapsed);
            let expected = upstreams.expected_latency(&models[0]).unwrap_or(Duration::ZERO);
            if remaining.is_zero() || expected > remaining {
                return Err(KeptLocal::LatencyBudget);
            }
            Some(remaining)
        }
    };
    Ok(Cleared {
        models,
        redact,
        remaining,
    })
}
