//! Prices of tokens, and the one place where the cost of a request is computed.

use std::collections::HashMap;

use serde::Deserialize;

/// Price of one model's tokens, in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    /// Returns the cost of `input` prompt and `output` completion tokens, in USD.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_mtok + output as f64 * self.output_per_mtok) / 1_000_000.0
    }

    fn validate(&self, name: &str) -> Result<(), String> {
        for (field, value) in [("input_per_mtok", self.input_per_mtok), ("output_per_mtok", self.output_per_mtok)] {
            if !value.is_finite() || value < 0.0 {
                return Err(format!("`{name}.{field}` must be a price of 0 or more USD, got {value}"));
            }
        }
        Ok(())
    }
}

/// The prices in force: local models at an amortised cost, remote models at their provider
/// prices, and the baseline that every request is also priced at, to measure what tiering saved.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    /// Label stored with every cost, so that a report can tell costs of different tables apart.
    pub version: String,
    /// Price of a local model's tokens, by model id; models not listed cost `local_default`.
    pub local: HashMap<String, Price>,
    pub local_default: Price,
    /// Remote prices by `provider/model`.
    pub remote: HashMap<String, Price>,
    /// Price that every request's tokens are also priced at: the counterfactual of sending
    /// everything to the frontier.
    pub baseline: Price,
}

/// Prices of one request's tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub cost_usd: f64,
    pub counterfactual_usd: f64,
}

impl PriceTable {
    /// Checks every price; the message names the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.version.trim().is_empty() {
            return Err("`pricing.version` must not be empty".into());
        }
        self.local_default.validate("pricing.local_default")?;
        self.baseline.validate("pricing.baseline")?;
        for (model, price) in &self.local {
            price.validate(&format!("pricing.local.{model}"))?;
        }
        for (model, price) in &self.remote {
            price.validate(&format!("pricing.remote.{model}"))?;
        }
        Ok(())
    }

    /// Prices a request served at `tier` by `provider` and `model` (`local` for tier 3).
    pub fn costs(&self, provider: &str, model: &str, input: u64, output: u64) -> Costs {
        // A request that reached no provider (rejected, or left by its client before routing)
        // has nothing to price.
        if provider.is_empty() && input == 0 && output == 0 {
            return Costs { cost_usd: 0.0, counterfactual_usd: 0.0 };
        }
        let price = if provider == crate::server::served::LOCAL_PROVIDER {
            self.local.get(model).copied().unwrap_or(self.local_default)
        } else {
            self.remote.get(&format!("{provider}/{model}")).copied().unwrap_or_else(|| {
                tracing::warn!(provider, model, "no price for this provider model; counting it as free");
                Price::default()
            })
        };
        Costs {
            cost_usd: price.cost(input, output),
            counterfactual_usd: self.baseline.cost(input, output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        PriceTable {
            version: "2026-12".into(),
            local: HashMap::from([("qwen".into(), Price { input_per_mtok: 0.01, output_per_mtok: 0.02 })]),
            local_default: Price::default(),
            remote: HashMap::from([("openai/mini".into(), Price { input_per_mtok: 0.15, output_per_mtok: 0.6 })]),
            baseline: Price { input_per_mtok: 3.0, output_per_mtok: 15.0 },
        }
    }

    #[test]
    fn costs_follow_the_table() {
        let table = table();
        let remote = table.costs("openai", "mini", 1_000, 500);
        assert!((remote.cost_usd - (1_000.0 * 0.15 + 500.0 * 0.6) / 1e6).abs() < 1e-15);
        assert!((remote.counterfactual_usd - (1_000.0 * 3.0 + 500.0 * 15.0) / 1e6).abs() < 1e-15);

        let local = table.costs("local", "qwen", 2_000_000, 0);
        assert!((local.cost_usd - 0.02).abs() < 1e-12);
        let unlisted = table.costs("local", "gemma", 2_000_000, 10);
        assert_eq!(unlisted.cost_usd, 0.0);
    }

    #[test]
    fn negative_prices_are_named() {
        let mut table = table();
        table.baseline.output_per_mtok = -1.0;
        let error = table.validate().unwrap_err();
        assert!(error.contains("pricing.baseline.output_per_mtok"), "{error}");
    }
}
