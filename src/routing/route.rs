//! `Route`: a `[[route]]` with its remote models parsed, ready to hand out escalation chains.

use super::config::{ModelRef, RouteConfig};
use super::gate::Candidate;

#[derive(Debug, Clone)]
pub struct Route {
    pub config: RouteConfig,
    tier2: Vec<ModelRef>,
    tier1: Vec<ModelRef>,
}

impl Route {
    /// Parses the route's model references; `RouteConfig::validate` has checked them.
    pub fn new(config: RouteConfig) -> Result<Self, String> {
        let parse = |entries: &[String]| entries.iter().map(|entry| ModelRef::parse(entry)).collect::<Result<Vec<_>, _>>();
        Ok(Self {
            tier2: parse(&config.tier2)?,
            tier1: parse(&config.tier1)?,
            config,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Returns the models that may serve a request sent to `tier`, in fallback order: that
    /// tier's models, then more capable tiers, then less capable remote tiers. So a request
    /// whose maximum tier excludes its own tier still reaches the best model allowed.
    pub fn candidates(&self, tier: u8) -> Vec<Candidate> {
        let tier2 = self.tier2.iter().map(|model| Candidate { model: model.clone(), tier: 2 });
        let tier1 = self.tier1.iter().map(|model| Candidate { model: model.clone(), tier: 1 });
        match tier {
            1 => tier1.chain(tier2).collect(),
            _ => tier2.chain(tier1).collect(),
        }
    }

    /// Returns the models a cascade escalates to, the cheapest remote tier first.
    pub fn cascade_candidates(&self) -> Vec<Candidate> {
        self.candidates(2)
    }
}
