//! The `[audit]` and `[pricing]` tables of the config file.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::postgres::PostgresStore;
use super::pricing::{Price, PriceTable};
use super::store::{AuditError, AuditStore, SqliteStore};
use crate::providers::ProviderConfig;
use crate::routing::config::ModelRef;

/// How much of a request's text the audit trail keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreText {
    /// No text, only counts and costs.
    #[default]
    None,
    /// The SHA-256 of the prompt and of the completion, to find repeated prompts.
    Hash,
    /// The prompt and the completion as they are.
    Full,
}

/// Database that the audit trail is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A SQLite file at `path`, for one server.
    #[default]
    Sqlite,
    /// A PostgreSQL database whose URL is in the environment variable `postgres_url_env`, for
    /// several replicas writing one trail.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub enabled: bool,
    pub store: StoreKind,
    /// SQLite database file; relative paths are resolved against the working directory.
    pub path: PathBuf,
    /// Environment variable holding the PostgreSQL URL, so the password stays out of the file.
    pub postgres_url_env: String,
    /// Seconds a failing batch is retried before its records are counted as lost; records that
    /// arrive meanwhile wait in the queue.
    pub retry_seconds: u64,
    /// Records that may wait for the writer before new ones are dropped and counted.
    pub queue_capacity: usize,
    pub store_text: StoreText,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: StoreKind::Sqlite,
            path: PathBuf::from("tierd-audit.db"),
            postgres_url_env: "TIERD_AUDIT_DATABASE_URL".into(),
            retry_seconds: 30,
            queue_capacity: 10_000,
            store_text: StoreText::None,
        }
    }
}

impl AuditConfig {
    /// Opens the configured store, creating its schema. Blocking: the PostgreSQL client runs its
    /// own runtime, so call it outside async code.
    pub fn open_store(&self) -> Result<Box<dyn AuditStore>, AuditError> {
        match self.store {
            StoreKind::Sqlite => Ok(Box::new(SqliteStore::open(&self.path)?)),
            StoreKind::Postgres => {
                let url = std::env::var(&self.postgres_url_env)
                    .ok()
                    .filter(|url| !url.trim().is_empty())
                    .ok_or_else(|| {
                        AuditError::Config(format!(
                            "`audit.store` is postgres, but the environment variable {} that \
                             `audit.postgres_url_env` names is not set or empty",
                            self.postgres_url_env
                        ))
                    })?;
                Ok(Box::new(PostgresStore::connect(&url)?))
            }
        }
    }

    /// Describes where records go, for the log.
    pub fn location(&self) -> String {
        match self.store {
            StoreKind::Sqlite => self.path.display().to_string(),
            StoreKind::Postgres => format!("PostgreSQL (URL in {})", self.postgres_url_env),
        }
    }
}

/// Opens the store that `tierd report --db` names: a `postgres://` or `postgresql://` URL, or
/// else a SQLite file.
pub fn open_for_reading(db: &str) -> Result<Box<dyn AuditStore>, AuditError> {
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        return Ok(Box::new(PostgresStore::connect_for_reading(db)?));
    }
    if !std::path::Path::new(db).is_file() {
        return Err(AuditError::NotFound(db.to_string()));
    }
    Ok(Box::new(SqliteStore::open_read_only(std::path::Path::new(db))?))
}

/// The `[pricing]` table. Remote prices come from the `[[provider.model]]` tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Label stored with every cost; change it when prices change.
    pub version: String,
    /// Amortised price of local models' tokens, by served model id.
    pub local: HashMap<String, Price>,
    /// Price of a local model without an entry in `local`.
    pub local_default: Price,
    /// `provider/model` whose prices give each request's counterfactual cost; by default the
    /// first tier-1 model of the providers.
    pub baseline: Option<String>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            version: "1".into(),
            local: HashMap::new(),
            local_default: Price::default(),
            baseline: None,
        }
    }
}

impl PricingConfig {
    /// Builds the price table from this table and the providers' prices; the message names the
    /// field at fault.
    pub fn table(&self, providers: &[ProviderConfig]) -> Result<PriceTable, String> {
        let mut remote = HashMap::new();
        for provider in providers {
            for model in &provider.models {
                remote.insert(format!("{}/{}", provider.name, model.id), model.price());
            }
        }
        let baseline = match &self.baseline {
            Some(text) => {
                let model = ModelRef::parse(text).map_err(|e| format!("`pricing.baseline`: {e}"))?;
                model.resolve(providers).map_err(|e| format!("`pricing.baseline`: {e}"))?;
                remote.get(text).copied().unwrap_or_default()
            }
            None => providers
                .iter()
                .flat_map(|p| p.models.iter())
                .find(|m| m.tier == 1)
                .map(|m| m.price())
                .unwrap_or_default(),
        };
        let table = PriceTable {
            version: self.version.clone(),
            local: self.local.clone(),
            local_default: self.local_default,
            remote,
            baseline,
        };
        table.validate()?;
        Ok(table)
    }
}
