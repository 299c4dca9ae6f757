//! Configuration of remote providers: one `[[provider]]` table each, with its models in
//! `[[provider.model]]` tables.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::Usage;
use crate::audit::Price;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The OpenAI chat completions API, or a server compatible with it.
    OpenAi,
    /// The Anthropic messages API.
    Anthropic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name used in logs and errors; unique among providers.
    pub name: String,
    pub kind: ProviderKind,
    /// API root that the endpoint path is appended to, such as `https://api.openai.com/v1`
    /// (`/chat/completions`) or `https://api.anthropic.com/v1` (`/messages`).
    pub base_url: String,
    /// Environment variable holding the API key, read when the client is created. Without it,
    /// requests carry no key, which suits local OpenAI-compatible servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Value of the `anthropic-version` header.
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
    /// `max_tokens` sent to Anthropic, which requires it, for a request that does not set it.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default, rename = "model")]
    pub models: Vec<ProviderModel>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// Limit on opening the connection, including the TLS handshake, in milliseconds.
    pub connect_ms: u64,
    /// Limit from sending a streaming request to the first byte of its body, in milliseconds.
    /// Non-streaming requests do not use it, because providers send nothing of such a response
    /// until the whole completion is generated, so only `total_ms` can bound them.
    pub first_byte_ms: u64,
    /// Limit on the whole exchange, including the entire stream, in milliseconds.
    pub total_ms: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            first_byte_ms: 30_000,
            total_ms: 300_000,
        }
    }
}

impl TimeoutConfig {
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }

    pub fn first_byte(&self) -> Duration {
        Duration::from_millis(self.first_byte_ms)
    }

    pub fn total(&self) -> Duration {
        Duration::from_millis(self.total_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderModel {
    /// Name clients use in the `model` field.
    pub id: String,
    /// Model name sent to the provider; `id` when not set.
    #[serde(default)]
    pub upstream: Option<String>,
    /// 1 for a frontier model, 2 for a mid-range one.
    pub tier: u8,
    /// Price of prompt tokens in USD per million tokens.
    pub input_per_mtok: f64,
    /// Price of completion tokens in USD per million tokens.
    pub output_per_mtok: f64,
    /// Expected response time in milliseconds, weighed against a request's latency budget until
    /// responses have been timed.
    #[serde(default)]
    pub latency_ms: Option<u64>,
}

impl ProviderModel {
    pub fn upstream_name(&self) -> &str {
        self.upstream.as_deref().unwrap_or(&self.id)
    }

    pub fn price(&self) -> Price {
        Price {
            input_per_mtok: self.input_per_mtok,
            output_per_mtok: self.output_per_mtok,
        }
    }

    /// Computes the price of a request's tokens in USD.
    pub fn cost_usd(&self, usage: &Usage) -> f64 {
        self.price().cost(usage.prompt_tokens, usage.completion_tokens)
    }
}

fn default_anthropic_version() -> String {
    "2023-06-01".to_string()
}

fn default_max_tokens() -> u64 {
    4096
}

impl ProviderConfig {
    /// Checks every field; the message names the provider and the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a provider has an empty `name`".into());
        }
        let name = &self.name;

        match reqwest::Url::parse(&self.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            _ => {
                return Err(format!(
                    "provider `{name}`: `base_url` must be an http:// or https:// URL, got `{}`",
                    self.base_url
                ))
            }
        }
        if let Some(var) = &self.api_key_env {
            if var.trim().is_empty() || var.contains('=') || var.contains('\0') {
                return Err(format!(
                    "provider `{name}`: `api_key_env` must be an environment variable name, got `{var}`"
                ));
            }
        }
        if self.anthropic_version.trim().is_empty() {
            return Err(format!("provider `{name}`: `anthropic_version` must not be empty"));
        }

        let timeouts = &self.timeouts;
        for (field, value) in [
            ("default_max_tokens", self.default_max_tokens),
            ("timeouts.connect_ms", timeouts.connect_ms),
            ("timeouts.first_byte_ms", timeouts.first_byte_ms),
            ("timeouts.total_ms", timeouts.total_ms),
        ] {
            if value == 0 {
                return Err(format!("provider `{name}`: `{field}` must be at least 1"));
            }
        }

        if self.models.is_empty() {
            return Err(format!("provider `{name}` has no `[[provider.model]]` entries"));
        }
        let mut seen = HashSet::new();
        for model in &self.models {
            validate_model(name, model)?;
            if !seen.insert(model.id.as_str()) {
                return Err(format!("provider `{name}`: model id `{}` is listed twice", model.id));
            }
        }
        Ok(())
    }
}

fn validate_model(provider: &str, model: &ProviderModel) -> Result<(), String> {
    if model.id.trim().is_empty() {
        return Err(format!("provider `{provider}`: a model has an empty `id`"));
    }
    let id = &model.id;

    if model.upstream.as_deref().is_some_and(|upstream| upstream.trim().is_empty()) {
        return Err(format!("provider `{provider}`, model `{id}`: `upstream` must not be empty"));
    }
    if !matches!(model.tier, 1 | 2) {
        return Err(format!(
            "provider `{provider}`, model `{id}`: `tier` must be 1 (frontier) or 2 (mid-range), got {}",
            model.tier
        ));
    }
    for (field, price) in [
        ("input_per_mtok", model.input_per_mtok),
        ("output_per_mtok", model.output_per_mtok),
    ] {
        if !price.is_finite() || price < 0.0 {
            return Err(format!(
                "provider `{provider}`, model `{id}`: `{field}` must be a price of 0 or more USD, got {price}"
            ));
        }
    }
    Ok(())
}

/// Validates each provider and rejects two providers with the same name.
pub fn validate_providers(providers: &[ProviderConfig]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for provider in providers {
        provider.validate()?;
        if !seen.insert(provider.name.as_str()) {
            return Err(format!("provider `{}` is listed twice", provider.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_API_KEY"

[[model]]
id = "claude"
upstream = "claude-sonnet-4-5"
tier = 1
input_per_mtok = 3.0
output_per_mtok = 15.0
"#;

    fn parse(text: &str) -> ProviderConfig {
        toml::from_str(text).expect("valid provider TOML")
    }

    #[test]
    fn defaults_apply() {
        let config = parse(VALID);
        assert_eq!(config.kind, ProviderKind::Anthropic);
        assert_eq!(config.anthropic_version, "2023-06-01");
        assert_eq!(config.default_max_tokens, 4096);
        assert_eq!(config.timeouts.total_ms, 300_000);
        assert_eq!(config.models[0].upstream_name(), "claude-sonnet-4-5");
        assert!(config.validate().is_ok());
    }

    #[test]
    fn upstream_defaults_to_id() {
        let config = parse(&VALID.replace("upstream = \"claude-sonnet-4-5\"\n", ""));
        assert_eq!(config.models[0].upstream_name(), "claude");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let error = toml::from_str::<ProviderConfig>(&format!("api_key = \"sk-x\"\n{VALID}"))
            .expect_err("unknown field")
            .to_string();
        assert!(error.contains("api_key"), "{error}");
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            ("base_url = \"https://api.anthropic.com/v1\"", "base_url = \"ftp://x\"", "base_url"),
            ("api_key_env = \"ANTHROPIC_API_KEY\"", "api_key_env = \" \"", "api_key_env"),
            ("tier = 1", "tier = 3", "tier"),
            ("input_per_mtok = 3.0", "input_per_mtok = -1.0", "input_per_mtok"),
            ("output_per_mtok = 15.0", "output_per_mtok = nan", "output_per_mtok"),
            ("upstream = \"claude-sonnet-4-5\"", "upstream = \"\"", "upstream"),
            ("kind = \"anthropic\"", "kind = \"anthropic\"\ndefault_max_tokens = 0", "default_max_tokens"),
        ];
        for (from, to, field) in cases {
            let config = parse(&VALID.replace(from, to));
            let error = config.validate().expect_err(field);
            assert!(error.contains(field), "{field}: {error}");
            assert!(error.contains("`anthropic`"), "{field}: {error}");
        }

        let zero_timeout = parse(&format!("{VALID}\n[timeouts]\ntotal_ms = 0\n"));
        let error = zero_timeout.validate().expect_err("zero timeout");
        assert!(error.contains("timeouts.total_ms"), "{error}");
    }

    #[test]
    fn duplicate_model_ids_are_rejected() {
        let text = format!("{VALID}\n[[model]]\nid = \"claude\"\ntier = 2\ninput_per_mtok = 1.0\noutput_per_mtok = 1.0\n");
        let error = parse(&text).validate().expect_err("duplicate id");
        assert!(error.contains("listed twice"), "{error}");
    }

    #[test]
    fn duplicate_provider_names_are_rejected() {
        let config = parse(VALID);
        let error = validate_providers(&[config.clone(), config]).expect_err("duplicate name");
        assert!(error.contains("listed twice"), "{error}");
    }

    #[test]
    fn cost_in_usd() {
        let config = parse(VALID);
        let usage = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 200_000,
        };
        assert!((config.models[0].cost_usd(&usage) - 6.0).abs() < 1e-9);
    }
}
