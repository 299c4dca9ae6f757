//! Client API keys: the `[[client_key]]` tables of the config, each a name and the SHA-256 of
//! the key, so that the config file never contains a usable key.

use std::collections::HashMap;

use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One `[[client_key]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// Name shown in audit records and reports in place of the key.
    pub name: String,
    /// SHA-256 of the key, as 64 hexadecimal digits (`tierd key hash` prints it).
    pub sha256: String,
}

/// The configured keys, by hash.
#[derive(Debug, Clone, Default)]
pub struct ClientKeys {
    names: HashMap<[u8; 32], String>,
}

impl ClientKeys {
    /// Checks the `[[client_key]]` tables and indexes them; the message names the table at
    /// fault.
    pub fn new(configs: &[ClientKeyConfig]) -> Result<Self, String> {
        Self::from_tables(configs, "client_key")
    }

    /// Checks key tables of the kind `table` (`client_key` or `admin_token`) and indexes them.
    pub fn from_tables(configs: &[ClientKeyConfig], table: &str) -> Result<Self, String> {
        let mut names = HashMap::new();
        for (index, config) in configs.iter().enumerate() {
            let field = format!("{table}[{index}]");
            if config.name.trim().is_empty() {
                return Err(format!("`{field}.name` must not be empty"));
            }
            let digest: [u8; 32] = hex::decode(config.sha256.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| {
                    format!(
                        "`{field}.sha256` must be 64 hexadecimal digits (the SHA-256 of the key), got `{}`",
                        config.sha256
                    )
                })?;
            if names.values().any(|name| name == &config.name) {
                return Err(format!("`{field}.name`: `{}` names two keys", config.name));
            }
            if let Some(other) = names.insert(digest, config.name.clone()) {
                return Err(format!("`{field}.sha256` is the same key as `{other}`"));
            }
        }
        Ok(Self { names })
    }

    /// Whether any key is configured, which makes every endpoint but `/health` require one.
    pub fn required(&self) -> bool {
        !self.names.is_empty()
    }

    /// Returns the name of `key`, or `None` when it is not a configured key.
    pub fn name_of(&self, key: &str) -> Option<&str> {
        self.names.get(&hash(key)).map(String::as_str)
    }
}

/// Returns the SHA-256 of `key`.
fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Returns the SHA-256 of `key` as the hexadecimal digits a `[[client_key]]` table expects.
pub fn hash_hex(key: &str) -> String {
    hex::encode(hash(key))
}

/// Returns a new random key: `sk-tierd-` and 48 hexadecimal digits (192 bits).
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk-tierd-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, key: &str) -> ClientKeyConfig {
        ClientKeyConfig {
            name: name.into(),
            sha256: hash_hex(key),
        }
    }

    #[test]
    fn configured_key_maps_to_its_name() {
        let keys = ClientKeys::new(&[config("billing", "sk-one"), config("search", "sk-two")]).expect("keys");
        assert!(keys.required());
        assert_eq!(keys.name_of("sk-two"), Some("search"));
        assert_eq!(keys.name_of("sk-three"), None);
        assert_eq!(keys.name_of(""), None);
    }

    #[test]
    fn malformed_hash_is_rejected() {
        let bad = ClientKeyConfig {
            name: "billing".into(),
            sha256: "not-hex".into(),
        };
        let error = ClientKeys::new(&[bad]).expect_err("bad hash");
        assert!(error.contains("client_key[0].sha256"), "{error}");
    }

    #[test]
    fn duplicate_names_and_keys_are_rejected() {
        let error = ClientKeys::new(&[config("a", "k1"), config("a", "k2")]).expect_err("same name");
        assert!(error.contains("client_key[1].name"), "{error}");
        let error = ClientKeys::new(&[config("a", "k1"), config("b", "k1")]).expect_err("same key");
        assert!(error.contains("client_key[1].sha256"), "{error}");
    }

    #[test]
    fn generated_keys_differ() {
        let (first, second) = (generate(), generate());
        assert_ne!(first, second);
        assert_eq!(first.len(), "sk-tierd-".len() + 48);
    }
}
