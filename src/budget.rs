//! Per-workflow prompt budgets: the `[[workflow]]` tables of the config. A prompt longer than
//! its workflow's budget is logged and counted (`warn`) or rejected with 400 (`reject`).

use std::collections::HashMap;

use serde::Deserialize;

/// Maximum length of a workflow tag, in characters. Longer tags in requests are cut to it, so a
/// longer table name could never match.
pub const MAX_WORKFLOW_CHARS: usize = 128;

/// Workflow name of the table that applies to every workflow without its own, and to requests
/// that name none.
pub const ANY_WORKFLOW: &str = "*";

/// Action on a prompt over its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetAction {
    /// Serve it, log a warning, count it in the metrics and flag its audit record.
    #[default]
    Warn,
    /// Reject it with 400, naming the budget.
    Reject,
}

impl BudgetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warn => "warn",
            Self::Reject => "reject",
        }
    }
}

/// One `[[workflow]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    /// Workflow tag as requests set it, or `*` for every other workflow.
    pub name: String,
    /// Largest prompt, in tokens of the local model that serves it.
    pub max_prompt_tokens: usize,
    #[serde(default)]
    pub on_exceed: BudgetAction,
}

/// The configured budgets, by workflow.
#[derive(Debug, Clone, Default)]
pub struct Budgets {
    by_workflow: HashMap<String, WorkflowConfig>,
}

/// A prompt over its budget.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    /// Name of the `[[workflow]]` table, which is `*` for the catch-all one.
    pub budget: String,
    pub max_prompt_tokens: usize,
    pub prompt_tokens: usize,
    pub action: BudgetAction,
}

impl Budgets {
    /// Checks the tables and indexes them; the message names the table at fault.
    pub fn new(configs: &[WorkflowConfig]) -> Result<Self, String> {
        let mut by_workflow = HashMap::new();
        for (index, config) in configs.iter().enumerate() {
            if config.name.trim().is_empty() {
                return Err(format!("`workflow[{index}].name` must not be empty"));
            }
            if config.name.chars().count() > MAX_WORKFLOW_CHARS {
                return Err(format!(
                    "`workflow[{index}].name` has {} characters; workflow names are cut to {MAX_WORKFLOW_CHARS}, so it could never match",
                    config.name.chars().count()
                ));
            }
            if config.max_prompt_tokens == 0 {
                return Err(format!("`workflow[{index}].max_prompt_tokens` must be at least 1"));
            }
            if by_workflow.insert(config.name.clone(), config.clone()).is_some() {
                return Err(format!("`workflow[{index}].name`: `{}` has two tables", config.name));
            }
        }
        Ok(Self { by_workflow })
    }

    /// Names of the workflows with their own table.
    pub fn workflows(&self) -> impl Iterator<Item = &str> {
        self.by_workflow.keys().map(String::as_str).filter(|name| *name != ANY_WORKFLOW)
    }

    /// Returns the budget that a prompt of `prompt_tokens` exceeds in `workflow`, if any.
    pub fn check(&self, workflow: Option<&str>, prompt_tokens: usize) -> Option<OverBudget> {
        let config = workflow
            .and_then(|name| self.by_workflow.get(name))
            .or_else(|| self.by_workflow.get(ANY_WORKFLOW))?;
        (prompt_tokens > config.max_prompt_tokens).then(|| OverBudget {
            budget: config.name.clone(),
            max_prompt_tokens: config.max_prompt_tokens,
            prompt_tokens,
            action: config.on_exceed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, max_prompt_tokens: usize, on_exceed: BudgetAction) -> WorkflowConfig {
        WorkflowConfig {
            name: name.into(),
            max_prompt_tokens,
            on_exceed,
        }
    }

    #[test]
    fn own_table_wins_over_catch_all() {
        let budgets = Budgets::new(&[
            table("support", 100, BudgetAction::Reject),
            table(ANY_WORKFLOW, 10, BudgetAction::Warn),
        ])
        .expect("budgets");
        assert_eq!(budgets.check(Some("support"), 100), None);
        let over = budgets.check(Some("support"), 101).expect("over");
        assert_eq!((over.budget.as_str(), over.action), ("support", BudgetAction::Reject));
        let over = budgets.check(Some("search"), 11).expect("over");
        assert_eq!((over.budget.as_str(), over.action), ("*", BudgetAction::Warn));
        assert!(budgets.check(None, 11).is_some());
        assert_eq!(budgets.workflows().collect::<Vec<_>>(), ["support"]);
    }

    #[test]
    fn no_catch_all_leaves_other_workflows_unbounded() {
        let budgets = Budgets::new(&[table("support", 100, BudgetAction::Reject)]).expect("budgets");
        assert_eq!(budgets.check(Some("search"), 1_000_000), None);
        assert_eq!(budgets.check(None, 1_000_000), None);
    }

    #[test]
    fn invalid_tables_are_rejected() {
        let error = Budgets::new(&[table("a", 0, BudgetAction::Warn)]).expect_err("zero");
        assert!(error.contains("workflow[0].max_prompt_tokens"), "{error}");
        let error = Budgets::new(&[table("a", 5, BudgetAction::Warn), table("a", 6, BudgetAction::Warn)])
            .expect_err("twice");
        assert!(error.contains("workflow[1].name"), "{error}");
        let long = "w".repeat(MAX_WORKFLOW_CHARS + 1);
        let error = Budgets::new(&[table(&long, 5, BudgetAction::Warn)]).expect_err("too long");
        assert!(error.contains("workflow[0].name"), "{error}");
    }
}
