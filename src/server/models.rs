//! `GET /v1/models`, `GET /health` and the fallback for unknown routes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::openai::{ModelCard, ModelList};
use super::AppState;
use crate::registry::ServedModel;
use crate::routing::resilience::BreakerState;

fn model_card(served: &ServedModel) -> ModelCard {
    ModelCard {
        id: served.id.clone(),
        object: "model",
        created: served.created,
        owned_by: "tierd",
    }
}

/// Builds the model card of a route, listed as a model because clients request it as one.
fn route_card(name: &str, state: &AppState) -> ModelCard {
    ModelCard {
        id: name.to_string(),
        object: "model",
        created: state.registry.load_full().and_then(|r| r.iter().map(|m| m.created).max()).unwrap_or(0),
        owned_by: "tierd-route",
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<axum::Json<ModelList>, ApiError> {
    let registry = state.registry()?;
    let policy = state.policy();
    let mut routes: Vec<&String> = policy.routes.keys().collect();
    routes.sort();
    let data = registry
        .iter()
        .map(|served| model_card(served))
        .chain(routes.into_iter().map(|name| route_card(name, &state)))
        .collect();
    Ok(axum::Json(ModelList {
        object: "list",
        data,
    }))
}

/// `GET /v1/models/{id}`, which the OpenAI SDKs call `models.retrieve`.
pub async fn retrieve_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    let registry = state.registry()?;
    if state.policy().routes.contains_key(&id) {
        return Ok(axum::Json(route_card(&id, &state)));
    }
    let served = registry.get(&id).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(axum::Json(model_card(&served)))
}

/// 200 with each model's load time and queue depth, the task names and each provider's
/// breaker state, once models and tasks have loaded; 503 before.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (Some(registry), Some(tasks)) = (state.registry.load_full(), state.tasks.load_full()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response();
    };
    let models: Vec<_> = registry
        .iter()
        .map(|served| {
            json!({
                "id": served.id,
                "load_ms": served.model.load_time.as_millis() as u64,
                "file_bytes": served.model.file_size,
                "context_length": served.context_length,
                "queue_depth": served.worker.queue_depth(),
            })
        })
        .collect();
    let tasks: Vec<&str> = tasks.iter().map(|task| task.name.as_str()).collect();
    let policy = state.policy();
    let providers: Vec<_> = policy
        .upstreams
        .breaker_states()
        .into_iter()
        .map(|(name, breaker)| {
            let (state, failures) = match breaker {
                BreakerState::Closed { failures } => ("closed", failures),
                BreakerState::Open { .. } => ("open", 0),
                BreakerState::HalfOpen { .. } => ("half_open", 0),
            };
            json!({"name": name, "breaker": state, "consecutive_failures": failures})
        })
        .collect();
    axum::Json(json!({"status": "ok", "models": models, "tasks": tasks, "providers": providers})).into_response()
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let mut error = ApiError::invalid_request(
        format!("Method {method} is not allowed on `{}`.", uri.path()),
        None,
    );
    error.status = StatusCode::METHOD_NOT_ALLOWED;
    error
}

pub async fn not_found(uri: Uri) -> ApiError {
    let mut error = ApiError::invalid_request(format!("Unknown route `{}`.", uri.path()), None);
    error.status = StatusCode::NOT_FOUND;
    error
}
