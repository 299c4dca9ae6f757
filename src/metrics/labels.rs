//! `LabelBounds`: keeps the label values of the metrics to a bounded set, because every distinct
//! value is a new time series in Prometheus and clients choose some of them.

use std::collections::HashSet;
use std::sync::Mutex;

/// Label value of a client-chosen value beyond the bound, or of a name tierd does not serve.
pub const OTHER: &str = "other";

/// The label values that metrics may carry.
pub struct LabelBounds {
    /// Local model ids and the model ids of every configured provider.
    models: HashSet<String>,
    /// `local` and the configured provider names.
    providers: HashSet<String>,
    tasks: HashSet<String>,
    /// Workflows with a budget, which always keep their name and take no place among
    /// `max_workflows`.
    budgeted: HashSet<String>,
    /// Other workflows seen so far, up to `max_workflows`.
    workflows: Mutex<HashSet<String>>,
    max_workflows: usize,
}

impl LabelBounds {
    pub fn new(
        models: impl IntoIterator<Item = String>,
        providers: impl IntoIterator<Item = String>,
        tasks: impl IntoIterator<Item = String>,
        budgeted_workflows: impl IntoIterator<Item = String>,
        max_workflows: usize,
    ) -> Self {
        Self {
            models: models.into_iter().collect(),
            providers: providers.into_iter().collect(),
            tasks: tasks.into_iter().collect(),
            budgeted: budgeted_workflows.into_iter().collect(),
            workflows: Mutex::new(HashSet::new()),
            max_workflows,
        }
    }

    /// Returns `model` when it is served or configured, `""` for none and `other` otherwise.
    pub fn model<'a>(&self, model: &'a str) -> &'a str {
        known(&self.models, model)
    }

    pub fn provider<'a>(&self, provider: &'a str) -> &'a str {
        known(&self.providers, provider)
    }

    pub fn task<'a>(&self, task: Option<&'a str>) -> &'a str {
        known(&self.tasks, task.unwrap_or(""))
    }

    /// Returns `workflow` while fewer than the maximum number of workflows have been seen, and
    /// `other` for every new one after that.
    pub fn workflow<'a>(&self, workflow: Option<&'a str>) -> &'a str {
        let Some(workflow) = workflow.filter(|w| !w.is_empty()) else {
            return "";
        };
        if self.budgeted.contains(workflow) {
            return workflow;
        }
        let mut seen = self.workflows.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(workflow) {
            return workflow;
        }
        if seen.len() < self.max_workflows {
            seen.insert(workflow.to_string());
            return workflow;
        }
        OTHER
    }
}

fn known<'a>(set: &HashSet<String>, value: &'a str) -> &'a str {
    if value.is_empty() || set.contains(value) {
        value
    } else {
        OTHER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_workflows: usize) -> LabelBounds {
        LabelBounds::new(
            ["qwen".to_string()],
            ["local".to_string()],
            ["sentiment".to_string()],
            ["billing".to_string()],
            max_workflows,
        )
    }

    #[test]
    fn unknown_names_become_other() {
        let bounds = bounds(4);
        assert_eq!(bounds.model("qwen"), "qwen");
        assert_eq!(bounds.model("gpt-9"), OTHER);
        assert_eq!(bounds.model(""), "");
        assert_eq!(bounds.provider("mystery"), OTHER);
        assert_eq!(bounds.task(None), "");
        assert_eq!(bounds.task(Some("sentiment")), "sentiment");
        assert_eq!(bounds.task(Some("nope")), OTHER);
    }

    #[test]
    fn workflows_beyond_the_maximum_become_other() {
        let bounds = bounds(2);
        assert_eq!(bounds.workflow(Some("billing")), "billing");
        assert_eq!(bounds.workflow(Some("a")), "a");
        // `billing` has a budget, so it takes no place: `b` is the second.
        assert_eq!(bounds.workflow(Some("b")), "b");
        assert_eq!(bounds.workflow(Some("c")), OTHER);
        // A workflow admitted earlier keeps its label.
        assert_eq!(bounds.workflow(Some("a")), "a");
        assert_eq!(bounds.workflow(None), "");
    }
}
