//! `Upstreams`: the configured providers, their shared health state, and the latency measured
//! for each of their models.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::ModelRef;
use super::resilience::{BreakerState, ChainEntry, HealthRegistry, ResilienceConfig, Resilient};
use crate::providers::{Provider, ProviderConfig, ProviderError, ProviderModel};

/// Weight of the newest response in a model's moving average latency.
const LATENCY_SMOOTHING: f64 = 0.2;

/// Every configured provider, built once at start and shared by all requests.
#[derive(Debug)]
pub struct Upstreams {
    providers: HashMap<String, Arc<Provider>>,
    health: HealthRegistry,
    /// Exponentially weighted moving average of response times, by `provider/model`.
    latency: Mutex<HashMap<String, Duration>>,
}

impl Upstreams {
    /// Creates the provider clients, reading their API keys from the environment.
    pub fn new(configs: &[ProviderConfig], resilience: ResilienceConfig) -> Result<Self, ProviderError> {
        let mut providers = HashMap::new();
        for config in configs {
            providers.insert(config.name.clone(), Arc::new(Provider::new(config.clone())?));
        }
        Ok(Self {
            providers,
            health: HealthRegistry::new(resilience),
            latency: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Returns each provider's name and breaker state, sorted by name.
    pub fn breaker_states(&self) -> Vec<(&str, BreakerState)> {
        let mut states: Vec<(&str, BreakerState)> = self
            .providers
            .keys()
            .map(|name| (name.as_str(), self.health.get(name).breaker.state()))
            .collect();
        states.sort_by_key(|(name, _)| *name);
        states
    }

    /// Returns the configured model that `model` points to.
    pub fn model(&self, model: &ModelRef) -> Option<&ProviderModel> {
        self.providers.get(&model.provider)?.model(&model.model)
    }

    /// Builds a fallback chain over `models`, skipping any that is not configured (config
    /// validation has rejected those already).
    pub fn chain(&self, models: &[ModelRef]) -> Resilient {
        let entries = models
            .iter()
            .filter_map(|model| {
                let provider = self.providers.get(&model.provider)?;
                Some(ChainEntry::new(provider.clone(), model.model.clone()))
            })
            .collect();
        Resilient::new(entries, &self.health)
    }

    /// Returns the expected response time of `model`: the moving average of its timed
    /// responses, or its configured `latency_ms` before any was timed.
    pub fn expected_latency(&self, model: &ModelRef) -> Option<Duration> {
        let measured = self
            .latency
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&model.to_string())
            .copied();
        measured.or_else(|| self.model(model)?.latency_ms.map(Duration::from_millis))
    }

    /// Adds the time of one complete response of `provider/model` to its moving average.
    pub fn record_latency(&self, provider: &str, model: &str, took: Duration) {
        let mut latency = self.latency.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        latency
            .entry(format!("{provider}/{model}"))
            .and_modify(|average| {
                *average = average.mul_f64(1.0 - LATENCY_SMOOTHING) + took.mul_f64(LATENCY_SMOOTHING);
            })
            .or_insert(took);
    }
}
