//! `Route`: a `[[route]]` with its remote models parsed, ready to hand out escalation chains.

use super::config::{ModelRef, RouteConfig, RouteMode};
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

    /// Checks a pre-routing route's `route_tiers` against the labels of its loaded route task:
    /// every label needs a tier, and every key must be a label.
    pub fn check_route_labels(&self, labels: &[String]) -> Result<(), String> {
        let config = &self.config;
        if config.mode != RouteMode::PreRoute {
            return Ok(());
        }
        if let Some(unknown) = config.route_tiers.keys().find(|key| !labels.contains(key)) {
            return Err(format!(
                "route `{}`: `route_tiers` names `{unknown}`, which is not a label of task `{}` (labels: {})",
                config.name,
                config.route_task,
                labels.join(", ")
            ));
        }
        if let Some(missing) = labels.iter().find(|label| !config.route_tiers.contains_key(*label)) {
            return Err(format!(
                "route `{}`: `route_tiers` has no tier for label `{missing}` of task `{}`",
                config.name, config.route_task
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tiers: &str) -> Route {
        let text = format!("name = \"auto\"\nmode = \"pre_route\"\nlocal = \"qwen\"\nroute_tiers = {tiers}\n");
        Route::new(toml::from_str(&text).expect("route TOML")).expect("route")
    }

    #[test]
    fn route_tiers_must_cover_the_task_labels() {
        let labels = ["simple".to_string(), "complex".to_string()];
        assert!(route("{ simple = 3, complex = 1 }").check_route_labels(&labels).is_ok());

        let error = route("{ simple = 3, hard = 1 }").check_route_labels(&labels).unwrap_err();
        assert!(error.contains("`hard`"), "{error}");
        let error = route("{ simple = 3 }").check_route_labels(&labels).unwrap_err();
        assert!(error.contains("`complex`"), "{error}");
    }
}
