//! API keys, kept as ready HTTP header values that never appear in Debug output or logs.

use reqwest::header::HeaderValue;

use super::ProviderError;

/// An API key in the form one provider's auth header takes, such as `Bearer sk-...`.
#[derive(Clone)]
pub struct ApiKey {
    header: HeaderValue,
    /// The bare key, to remove it from error text that a provider echoes back.
    secret: String,
}

impl ApiKey {
    /// Reads the key from environment variable `var` and builds the header value
    /// `{prefix}{key}`, marked sensitive so HTTP-level logging redacts it too.
    pub fn from_env(provider: &str, var: &str, prefix: &str) -> Result<Self, ProviderError> {
        let missing = || ProviderError::MissingKey {
            provider: provider.to_string(),
            var: var.to_string(),
        };
        let key = std::env::var(var).map_err(|_| missing())?;
        let key = key.trim();
        if key.is_empty() {
            return Err(missing());
        }

        let mut value = HeaderValue::from_str(&format!("{prefix}{key}")).map_err(|_| {
            ProviderError::InvalidConfig(format!(
                "provider `{provider}`: environment variable `{var}` contains characters not allowed in an HTTP header"
            ))
        })?;
        value.set_sensitive(true);
        Ok(Self {
            header: value,
            secret: key.to_string(),
        })
    }

    pub(super) fn header_value(&self) -> HeaderValue {
        self.header.clone()
    }

    /// Replaces every occurrence of the key in `text` with `<redacted>`. A provider that
    /// rejects a key may quote it in its error body, which ends up in logs and responses.
    pub fn scrub(&self, text: &str) -> String {
        text.replace(&self.secret, "<redacted>")
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}
