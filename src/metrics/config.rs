//! The `[metrics]` table of the config.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct workflow label values besides the workflows with a `[[workflow]]` table, which
    /// always keep their name; later workflows are labelled `other`.
    pub max_workflows: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { max_workflows: 50 }
    }
}
