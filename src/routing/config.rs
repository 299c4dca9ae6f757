//! Configuration of routing: `[[route]]` tables for chat, the `[escalate]` table of a task,
//! and the `[resilience]` table shared by every provider.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::resilience::{BreakerConfig, Jitter, ResilienceConfig, RetryBudgetConfig, RetryPolicy};
use crate::providers::ProviderConfig;

/// Reference to a provider's model, written `provider/model` with the model's configured `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((provider, model)) if !provider.trim().is_empty() && !model.trim().is_empty() => Ok(Self {
                provider: provider.to_string(),
                model: model.to_string(),
            }),
            _ => Err(format!("`{text}` is not of the form `provider/model`")),
        }
    }

    /// Checks that the provider exists and lists the model; returns the model's tier.
    pub fn resolve(&self, providers: &[ProviderConfig]) -> Result<u8, String> {
        let provider = providers
            .iter()
            .find(|p| p.name == self.provider)
            .ok_or_else(|| format!("no `[[provider]]` is named `{}`", self.provider))?;
        provider
            .models
            .iter()
            .find(|m| m.id == self.model)
            .map(|m| m.tier)
            .ok_or_else(|| format!("provider `{}` has no model `{}`", self.provider, self.model))
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Decision rule of a route between the local model and the providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// The local model generates a completion first. It is kept when its confidence reaches
    /// `threshold`, and the request escalates otherwise.
    #[default]
    Cascade,
    /// The route task classifies the request text, and its label picks the tier.
    PreRoute,
}

/// Formula for the confidence of a completion, computed from its tokens' log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceMetric {
    /// Geometric mean of the chosen tokens' probabilities: `exp(mean(logprob))`.
    #[default]
    Mean,
    /// Probability of the least likely chosen token.
    Min,
    /// Mean over tokens of the gap between the two most likely tokens' probabilities.
    Margin,
}

impl ConfidenceMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Min => "min",
            Self::Margin => "margin",
        }
    }
}

/// Treatment of a request in which the PII detector finds personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiPolicy {
    /// The request never leaves the box: the local completion is returned and flagged.
    #[default]
    Local,
    /// The personal data is replaced by placeholders before the request escalates.
    Redact,
}

/// One `[[route]]`: a model name clients request, and how its requests are routed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name clients put in `model`, such as `auto`.
    pub name: String,
    #[serde(default)]
    pub mode: RouteMode,
    /// Served model of tier 3.
    pub local: String,
    /// Mid-range models (`provider/model`), in fallback order.
    #[serde(default)]
    pub tier2: Vec<String>,
    /// Frontier models (`provider/model`), in fallback order.
    #[serde(default)]
    pub tier1: Vec<String>,
    /// Cascade: the local completion is kept when its confidence is at least this.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub confidence: ConfidenceMetric,
    /// Pre-routing: the classification task that reads the request text.
    #[serde(default = "default_route_task")]
    pub route_task: String,
    /// Pre-routing: the tier each label of `route_task` sends a request to.
    #[serde(default = "default_route_tiers")]
    pub route_tiers: HashMap<String, u8>,
    #[serde(default)]
    pub pii: PiiPolicy,
    /// Whether the local completion is returned when every provider of the chain failed.
    /// When false, such a request gets 502.
    #[serde(default = "default_true")]
    pub local_fallback: bool,
}

fn default_threshold() -> f64 {
    0.6
}

fn default_route_task() -> String {
    "route".into()
}

fn default_route_tiers() -> HashMap<String, u8> {
    HashMap::from([("simple".into(), 3), ("moderate".into(), 2), ("complex".into(), 1)])
}

fn default_true() -> bool {
    true
}

/// The `[escalate]` table of a classification task: where results below the task's threshold
/// are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationConfig {
    /// Models (`provider/model`) asked to pick a label, in fallback order.
    pub to: Vec<String>,
    #[serde(default)]
    pub pii: PiiPolicy,
}

impl EscalationConfig {
    pub fn validate(&self, task: &str, providers: &[ProviderConfig]) -> Result<Vec<ModelRef>, String> {
        if self.to.is_empty() {
            return Err(format!("task `{task}`: `escalate.to` lists no model"));
        }
        self.to
            .iter()
            .map(|entry| {
                let model = ModelRef::parse(entry).map_err(|e| format!("task `{task}`: `escalate.to`: {e}"))?;
                model
                    .resolve(providers)
                    .map_err(|e| format!("task `{task}`: `escalate.to`: {e}"))?;
                Ok(model)
            })
            .collect()
    }
}

impl RouteConfig {
    /// Checks every field against the served models and providers; the message names the route
    /// and the field at fault.
    pub fn validate(&self, providers: &[ProviderConfig]) -> Result<(), String> {
        let name = &self.name;
        if name.trim().is_empty() {
            return Err("a route has an empty `name`".into());
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!("route `{name}`: `threshold` must be between 0 and 1, got {}", self.threshold));
        }
        for (field, entries, tier) in [("tier2", &self.tier2, 2), ("tier1", &self.tier1, 1)] {
            for entry in entries {
                let model = ModelRef::parse(entry).map_err(|e| format!("route `{name}`: `{field}`: {e}"))?;
                let actual = model.resolve(providers).map_err(|e| format!("route `{name}`: `{field}`: {e}"))?;
                if actual != tier {
                    return Err(format!(
                        "route `{name}`: `{field}` lists `{entry}`, whose provider config says tier {actual}"
                    ));
                }
            }
        }
        if self.mode == RouteMode::PreRoute {
            for (label, tier) in &self.route_tiers {
                if !matches!(tier, 1..=3) {
                    return Err(format!(
                        "route `{name}`: `route_tiers.{label}` must be 1, 2 or 3, got {tier}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `[resilience]` table: retries, retry budget and circuit breaker of every provider.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceSettings {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    pub jitter: JitterSetting,
    pub retry_budget_ratio: f64,
    pub retry_budget_min: u32,
    pub retry_budget_window_ms: u64,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterSetting {
    None,
    Full,
    Equal,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        let defaults = ResilienceConfig::default();
        Self {
            max_attempts: defaults.retry.max_attempts,
            base_delay_ms: defaults.retry.base_delay.as_millis() as u64,
            max_delay_ms: defaults.retry.max_delay.as_millis() as u64,
            jitter: JitterSetting::Full,
            retry_budget_ratio: defaults.budget.ratio,
            retry_budget_min: defaults.budget.min_retries,
            retry_budget_window_ms: defaults.budget.window.as_millis() as u64,
            breaker_failures: defaults.breaker.failure_threshold,
            breaker_cooldown_ms: defaults.breaker.cooldown.as_millis() as u64,
        }
    }
}

impl ResilienceSettings {
    /// Validates the values and converts them; the message names the field at fault.
    pub fn to_config(&self) -> Result<ResilienceConfig, String> {
        for (field, value) in [
            ("max_attempts", u64::from(self.max_attempts)),
            ("retry_budget_window_ms", self.retry_budget_window_ms),
            ("breaker_failures", u64::from(self.breaker_failures)),
        ] {
            if value == 0 {
                return Err(format!("`resilience.{field}` must be at least 1"));
            }
        }
        if self.max_delay_ms < self.base_delay_ms {
            return Err(format!(
                "`resilience.max_delay_ms` ({}) must be at least `base_delay_ms` ({})",
                self.max_delay_ms, self.base_delay_ms
            ));
        }
        if !self.retry_budget_ratio.is_finite() || self.retry_budget_ratio < 0.0 {
            return Err(format!(
                "`resilience.retry_budget_ratio` must be 0 or more, got {}",
                self.retry_budget_ratio
            ));
        }
        Ok(ResilienceConfig {
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base_delay: Duration::from_millis(self.base_delay_ms),
                max_delay: Duration::from_millis(self.max_delay_ms),
                jitter: match self.jitter {
                    JitterSetting::None => Jitter::None,
                    JitterSetting::Full => Jitter::Full,
                    JitterSetting::Equal => Jitter::Equal,
                },
            },
            budget: RetryBudgetConfig {
                ratio: self.retry_budget_ratio,
                min_retries: self.retry_budget_min,
                window: Duration::from_millis(self.retry_budget_window_ms),
            },
            breaker: BreakerConfig {
                failure_threshold: self.breaker_failures,
                cooldown: Duration::from_millis(self.breaker_cooldown_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_refs_parse() {
        assert_eq!(
            ModelRef::parse("frontier/gpt").unwrap(),
            ModelRef { provider: "frontier".into(), model: "gpt".into() }
        );
        for bad in ["gpt", "/gpt", "frontier/", ""] {
            assert!(ModelRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn model_names_may_contain_slashes() {
        let model = ModelRef::parse("local/Qwen/Qwen2.5-7B").unwrap();
        assert_eq!(model.provider, "local");
        assert_eq!(model.model, "Qwen/Qwen2.5-7B");
    }

    #[test]
    fn resilience_defaults_match_the_library() {
        assert_eq!(ResilienceSettings::default().to_config().unwrap(), ResilienceConfig::default());
    }

    #[test]
    fn resilience_fields_are_named() {
        let settings = ResilienceSettings { max_attempts: 0, ..Default::default() };
        assert!(settings.to_config().unwrap_err().contains("max_attempts"));
        let settings = ResilienceSettings { max_delay_ms: 1, base_delay_ms: 5, ..Default::default() };
        assert!(settings.to_config().unwrap_err().contains("max_delay_ms"));
    }
}
