//! `POST /v1/classify` and `GET /v1/tasks`: classification with the configured tasks.

use std::sync::Arc;

use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::classify::backend::BackendError;
use crate::classify::task::{ClassifyResult, ClassifyUsage, LabelInfo};
use crate::classify::ClassifyError;

/// Inputs accepted in one request; larger batches should be split by the client.
const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub task: String,
    pub input: Input,
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
    pub results: Vec<ClassifyResult>,
    pub usage: ClassifyUsage,
}

pub async fn classify(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<ClassifyRequest>,
) -> Result<axum::Json<ClassifyResponse>, ApiError> {
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
    let classification = task.clone().classify(inputs).await.map_err(classify_error)?;
    let escalations = classification.results.iter().filter(|r| r.below_threshold).count();
    tracing::info!(
        task = %task.name,
        inputs = count,
        below_threshold = escalations,
        prompt_tokens = classification.usage.prompt_tokens,
        ms = classification.elapsed.as_millis() as u64,
        "classification finished"
    );
    Ok(axum::Json(ClassifyResponse {
        object: "classification",
        task: task.name.clone(),
        results: classification.results,
        usage: classification.usage,
    }))
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
    let data = tasks
        .iter()
        .map(|task| TaskCard {
            name: task.name.clone(),
            description: task.description.clone(),
            labels: task.labels.clone(),
            threshold: task.threshold,
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
