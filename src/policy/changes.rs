//! The settings that differ between two policies, for the history of policy changes: task
//! thresholds and the criteria of each route.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Policy;
use crate::routing::config::RouteConfig;

/// A setting whose value changed, with its values as JSON text (`null` when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Changed {
    pub setting: String,
    pub old_value: String,
    pub new_value: String,
}

/// Returns the route fields that the admin API changes and the history records.
fn route_criteria(route: &RouteConfig) -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        ("mode", json!(route.mode)),
        ("threshold", json!(route.threshold)),
        ("confidence", json!(route.confidence)),
        ("pii", json!(route.pii)),
        ("local_fallback", json!(route.local_fallback)),
        ("tier2", json!(route.tier2)),
        ("tier1", json!(route.tier1)),
    ])
}

/// Returns every task threshold and route criterion that differs from `old` to `new`, sorted by
/// setting name.
pub fn diff(old: &Policy, new: &Policy) -> Vec<Changed> {
    let mut before: BTreeMap<String, Value> = BTreeMap::new();
    let mut after: BTreeMap<String, Value> = BTreeMap::new();
    for (policy, values) in [(old, &mut before), (new, &mut after)] {
        for (task, threshold) in &policy.thresholds {
            values.insert(format!("task.{task}.threshold"), json!(threshold));
        }
        for (name, route) in &policy.routes {
            for (field, value) in route_criteria(&route.config) {
                values.insert(format!("route.{name}.{field}"), value);
            }
        }
    }
    let settings: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    settings
        .into_iter()
        .filter_map(|setting| {
            let (old_value, new_value) = (before.get(setting), after.get(setting));
            (old_value != new_value).then(|| Changed {
                setting: setting.clone(),
                old_value: old_value.unwrap_or(&Value::Null).to_string(),
                new_value: new_value.unwrap_or(&Value::Null).to_string(),
            })
        })
        .collect()
}
