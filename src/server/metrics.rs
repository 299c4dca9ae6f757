//! `GET /metrics`: every metric in the Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::metrics::{Snapshot, CONTENT_TYPE as PROMETHEUS_TEXT};

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let generation_queues = state
        .registry
        .load_full()
        .map(|registry| {
            registry
                .iter()
                .map(|served| (served.id.clone(), served.worker.queue_depth()))
                .collect()
        })
        .unwrap_or_default();
    let snapshot = Snapshot {
        generation_queues,
        audit: state.audit.writer.as_ref().map(|writer| writer.stats().as_ref()),
    };
    let text = state.audit.metrics.render(&snapshot).map_err(ApiError::internal)?;
    Ok(([(CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response())
}
