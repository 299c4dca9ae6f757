//! Applies the workflow prompt budgets to a prompt once its tokens are counted.

use super::error::ApiError;
use crate::audit::handle::AuditHandle;
use crate::budget::{BudgetAction, Budgets, ANY_WORKFLOW};
use crate::metrics::Metrics;

/// The budgets of the policy a request started with, and the metrics that count prompts over
/// them.
#[derive(Clone, Copy)]
pub(super) struct BudgetGate<'a> {
    pub budgets: &'a Budgets,
    pub metrics: &'a Metrics,
}

/// Checks a prompt of `prompt_tokens` against its workflow's budget. A prompt over a `warn`
/// budget is logged, counted and flagged in its audit record; over a `reject` budget it also
/// gets 400 naming the budget and `param`. A request whose record is already flagged is not
/// counted again, because a routed request may count its prompt twice.
pub(super) fn check_budget(
    gate: BudgetGate<'_>,
    audit: Option<&AuditHandle>,
    prompt_tokens: usize,
    param: &str,
) -> Result<(), ApiError> {
    let (workflow, flagged) = audit.map_or((None, false), |audit| {
        audit.read(|record| (record.workflow.clone(), record.over_budget.is_some()))
    });
    let Some(over) = gate.budgets.check(workflow.as_deref(), prompt_tokens) else {
        return Ok(());
    };
    if flagged && over.action == BudgetAction::Warn {
        return Ok(());
    }
    let action = over.action.as_str();
    let workflow_label = workflow.as_deref().unwrap_or("");
    gate.metrics.budget_exceeded(workflow_label, action);
    tracing::warn!(
        workflow = workflow_label,
        budget = %over.budget,
        prompt_tokens,
        max_prompt_tokens = over.max_prompt_tokens,
        action,
        "prompt exceeds its workflow's token budget"
    );
    if let Some(audit) = audit {
        audit.update(|record| record.over_budget = Some(action.to_string()));
    }
    match over.action {
        BudgetAction::Warn => Ok(()),
        BudgetAction::Reject => Err(ApiError::invalid_request(
            format!(
                "The prompt has {prompt_tokens} tokens, over the budget of {} tokens of {} \
                 (`[[workflow]] max_prompt_tokens`). Shorten the {param}.",
                over.max_prompt_tokens,
                budget_name(&over.budget)
            ),
            Some(param),
        )
        .with_code("context_budget_exceeded")),
    }
}

fn budget_name(budget: &str) -> String {
    if budget == ANY_WORKFLOW {
        format!("the default workflow budget `{ANY_WORKFLOW}`")
    } else {
        format!("workflow `{budget}`")
    }
}
