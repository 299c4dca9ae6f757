//! `GET /metrics`: every metric in the Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::metrics::{Snapshot, CONTENT_TYPE as PROMETHEUS_TEXT};

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let registry = state.registry.load_full();
    let models: Vec<_> = registry.iter().flat_map(|registry| registry.iter()).collect();
    let snapshot = Snapshot {
        generation_queues: models
            .iter()
            .map(|served| (served.id.clone(), served.worker.queue_depth()))
            .collect(),
        audit: state.audit.writer.as_ref().map(|writer| writer.stats().as_ref()),
        prompt_caches: models
            .iter()
            .map(|served| (served.id.clone(), served.worker.prompt_cache_stats()))
            .collect(),
    };
    let text = state.audit.metrics.render(&snapshot).map_err(ApiError::internal)?;
    Ok(([(CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response())
}
