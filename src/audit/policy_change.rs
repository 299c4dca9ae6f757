//! `PolicyChange`: one change to the live policy, kept in the audit store so that the history
//! of thresholds and route settings survives restarts.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyChange {
    /// Time of the change, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Name of the admin token that made the change, or `config file` for an edit of the file.
    pub actor: String,
    /// The setting changed, such as `task.sentiment.threshold` or `route.auto.confidence`.
    pub setting: String,
    /// The values before and after, as JSON text; `null` for a setting that did not exist.
    pub old_value: String,
    pub new_value: String,
    /// Generation of the policy that the change produced.
    pub generation: u64,
}
