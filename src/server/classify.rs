//! `POST /v1/classify` and `GET /v1/tasks`: classification with the configured tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::classify_escalation::{EscalationReport, Escalator, Outcome};
use super::error::ApiError;
use super::json::ApiJson;
use super::served::LOCAL_PROVIDER;
use super::AppState;
use crate::audit::handle::AuditHandle;
use crate::classify::backend::BackendError;
use crate::classify::task::{ClassifyResult, ClassifyUsage, LabelInfo, ResultTimings};
use crate::classify::ClassifyError;
use crate::routing::criteria::{Criteria, CriteriaFields};
use crate::routing::gate::KeptLocal;

/// Inputs accepted in one request; larger batches should be split by the client.
const MAX_INPUTS: usize = 2048;

/// Number of results that a remote model labelled.
static ESCALATED_HEADER: HeaderName = HeaderName::from_static("x-tierd-escalated");
/// Number of results below the threshold that the gate kept local.
static KEPT_LOCAL_HEADER: HeaderName = HeaderName::from_static("x-tierd-kept-local");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub task: String,
    pub input: Input,
    /// Routing criteria, the same as the `X-Tierd-*` headers.
    #[serde(default)]
    pub tierd: Option<CriteriaFields>,
    /// Caller id as in OpenAI requests; the workflow of the request when neither the header
    /// nor `metadata.workflow` names one.
    #[serde(default)]
    pub user: Option<String>,
    /// Key-value tags; `workflow` names the request's workflow.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "expected a string or an array of strings")]
pub enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Serialize)]
pub struct ClassifyResponse {
    pub object: &'static str,
    pub task: String,
    pub results: Vec<ServedResult>,
    pub usage: ClassifyUsage,
}

/// One result as the endpoint returns it: the local backend's, or with `label` picked by a
/// remote model.
#[derive(Debug, Serialize)]
pub struct ServedResult {
    pub index: usize,
    pub label: String,
    /// Probability of `label` from the local backend; null when a remote model picked `label`,
    /// because providers report no probability.
    pub confidence: Option<f64>,
    /// Probability of every label from the local backend, also when the result escalated.
    pub scores: HashMap<String, f64>,
    /// Local backend and model that produced `scores`.
    pub backend: &'static str,
    pub model: String,
    /// True when the local confidence is below the threshold: the request's `min_confidence`,
    /// or else the task's.
    pub below_threshold: bool,
    pub truncated: bool,
    pub input_tokens: usize,
    pub timings: ResultTimings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationReport>,
    /// Reason that a result below the threshold was not escalated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_local: Option<KeptLocal>,
}

impl ServedResult {
    fn new(result: ClassifyResult, threshold: f64, outcome: Outcome) -> Self {
        let mut served = Self {
            index: result.index,
            label: result.label,
            confidence: Some(result.confidence),
            scores: result.scores,
            backend: result.backend,
            model: result.model,
            below_threshold: result.confidence < threshold,
            truncated: result.truncated,
            input_tokens: result.input_tokens,
            timings: result.timings,
            escalation: None,
            kept_local: None,
        };
        match outcome {
            Outcome::Local => {}
            Outcome::KeptLocal(reason) => served.kept_local = Some(reason),
            Outcome::Escalated { label, report } => {
                served.label = label;
                served.confidence = None;
                served.escalation = Some(report);
            }
        }
        served
    }
}

/// Writes what served a classification into its audit record: the local model's tokens, the
/// most capable tier used, and the cost of any escalation.
fn audit_results(audit: &AuditHandle, results: &[ServedResult], prompt_tokens: usize) {
    let first_model = results.first().map(|r| r.model.clone()).unwrap_or_default();
    let escalations: Vec<&EscalationReport> = results.iter().filter_map(|r| r.escalation.as_ref()).collect();
    let lowest = results.iter().filter_map(|r| r.confidence).fold(None, |low: Option<f64>, c| Some(low.map_or(c, |l| l.min(c))));
    let kept_local = results.iter().find_map(|r| r.kept_local).map(|k| k.as_str().to_string());
    audit.update(|record| {
        record.tier = 3;
        record.provider = LOCAL_PROVIDER.to_string();
        record.model = first_model;
        record.input_tokens = prompt_tokens as u64;
        record.confidence = lowest;
        record.kept_local = kept_local;
        if let Some(most_capable) = escalations.iter().min_by_key(|e| e.tier) {
            record.tier = most_capable.tier;
            record.escalation = Some(most_capable.reason.as_str().to_string());
            // The local model's tokens are priced as local; the escalations add their own cost.
            record.cost_usd = escalations.iter().map(|e| e.cost_usd).sum();
            record.upstream_ms = Some(escalations.iter().map(|e| e.ms).sum());
        }
    });
}

pub async fn classify(
    State(state): State<Arc<AppState>>,
    audit: Option<axum::Extension<AuditHandle>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ClassifyRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let policy = state.policy();
    let audit = audit.map(|handle| handle.0);
    if let Some(audit) = &audit {
        super::audit::tag_workflow(audit, request.metadata.as_ref(), request.user.as_deref());
        let task = request.task.clone();
        audit.update(|record| record.task = Some(task));
    }
    let criteria = Criteria::from_request(&headers, request.tierd.as_ref())?;
    let tasks = state.tasks()?;
    let task = tasks.get(&request.task).ok_or_else(|| {
        ApiError::not_found(
            format!("The task `{}` does not exist; GET /v1/tasks lists the tasks.", request.task),
            "task",
            "task_not_found",
        )
    })?;
    let inputs = match request.input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid_request(
            format!("`input` has {} texts; at most {MAX_INPUTS} are accepted per request.", inputs.len()),
            Some("input"),
        ));
    }
    let count = inputs.len();
    if let Some(audit) = &audit {
        audit.set_prompt(&inputs.join("\n"));
    }
    // Only an escalation needs the texts after the local classification.
    let texts = if task.escalate.is_some() { inputs.clone() } else { Vec::new() };
    let classification = task.clone().classify(inputs).await.map_err(classify_error)?;

    let threshold = criteria
        .min_confidence
        .unwrap_or_else(|| policy.threshold(&task.name, task.threshold));
    let outcomes = match &task.escalate {
        Some(escalate) => {
            let escalator = Escalator {
                task: &task,
                escalate,
                upstreams: &policy.upstreams,
                criteria,
                arrived,
                threshold,
            };
            escalator.run(&classification.results, &texts).await?
        }
        None => classification.results.iter().map(|_| Outcome::Local).collect(),
    };
    let escalated = outcomes.iter().filter(|o| matches!(o, Outcome::Escalated { .. })).count();
    let kept_local = outcomes.iter().filter(|o| matches!(o, Outcome::KeptLocal(_))).count();
    let results: Vec<ServedResult> = classification
        .results
        .into_iter()
        .zip(outcomes)
        .map(|(result, outcome)| ServedResult::new(result, threshold, outcome))
        .collect();
    if let Some(audit) = &audit {
        audit_results(audit, &results, classification.usage.prompt_tokens);
        let labels: Vec<&str> = results.iter().map(|r| r.label.as_str()).collect();
        audit.set_completion(&labels.join("\n"));
    }
    tracing::info!(
        task = %task.name,
        inputs = count,
        below_threshold = results.iter().filter(|r| r.below_threshold).count(),
        escalated,
        kept_local,
        prompt_tokens = classification.usage.prompt_tokens,
        ms = arrived.elapsed().as_millis() as u64,
        "classification finished"
    );

    let mut response = axum::Json(ClassifyResponse {
        object: "classification",
        task: task.name.clone(),
        results,
        usage: classification.usage,
    })
    .into_response();
    if task.escalate.is_some() {
        let headers = response.headers_mut();
        headers.insert(ESCALATED_HEADER.clone(), HeaderValue::from(escalated));
        headers.insert(KEPT_LOCAL_HEADER.clone(), HeaderValue::from(kept_local));
    }
    Ok(response)
}

pub(super) fn classify_error(error: ClassifyError) -> ApiError {
    match &error {
        ClassifyError::NoInput => ApiError::invalid_request(format!("{error}."), Some("input")),
        ClassifyError::EmptyInput { index }
        | ClassifyError::NoTokens { index, .. }
        | ClassifyError::TooLong { index, .. }
        | ClassifyError::Prepare { index, .. } => {
            ApiError::invalid_request(format!("{error}."), Some(&format!("input[{index}]")))
        }
        ClassifyError::Backend(BackendError::QueueFull(full)) => {
            ApiError::overloaded(format!("{full}; retry later."), 1)
        }
        ClassifyError::Backend(BackendError::Failed { .. }) | ClassifyError::Internal(_) => {
            ApiError::internal(error)
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TaskCard {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub labels: Vec<LabelInfo>,
    pub threshold: f64,
    pub max_input_tokens: usize,
    pub on_overflow: crate::classify::task_config::Overflow,
    pub backends: Vec<BackendCard>,
}

#[derive(Debug, Serialize)]
pub struct BackendCard {
    pub kind: &'static str,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TaskList {
    pub object: &'static str,
    pub data: Vec<TaskCard>,
}

pub async fn list_tasks(State(state): State<Arc<AppState>>) -> Result<axum::Json<TaskList>, ApiError> {
    let tasks = state.tasks()?;
    let policy = state.policy();
    let data = tasks
        .iter()
        .map(|task| TaskCard {
            name: task.name.clone(),
            description: task.description.clone(),
            labels: task.labels.clone(),
            threshold: policy.threshold(&task.name, task.threshold),
            max_input_tokens: task.max_input_tokens,
            on_overflow: task.on_overflow,
            backends: task
                .backends
                .iter()
                .map(|b| BackendCard {
                    kind: b.kind,
                    model: b.model.clone(),
                    accept: b.accept,
                })
                .collect(),
        })
        .collect();
    Ok(axum::Json(TaskList { object: "list", data }))
}
