//! The `audit_request` middleware, which starts the audit record of each inference request,
//! and the workflow tag that reports and budgets group requests by.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::{error, AppState, RequestId};
use crate::audit::handle::AuditHandle;
use crate::audit::AuditRecord;
use crate::budget::MAX_WORKFLOW_CHARS;

/// Endpoints whose requests are audited.
const AUDITED: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/classify"];

/// Header naming the workflow a request belongs to, for cost reports.
static WORKFLOW_HEADER: HeaderName = HeaderName::from_static("x-tierd-workflow");

/// Creates the audit record of an inference request, for the handler to fill in, and records
/// the response's status and error.
pub(super) async fn audit_request(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if !AUDITED.contains(&path.as_str()) {
        return next.run(request).await;
    }
    let sink = state.audit.clone();
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    // Header values may carry UTF-8, which `HeaderValue::to_str` rejects as not visible ASCII.
    let workflow = request
        .headers()
        .get(&WORKFLOW_HEADER)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| v.chars().take(MAX_WORKFLOW_CHARS).collect());
    let record = AuditRecord {
        id,
        time_ms: unix_time_ms(),
        workflow,
        endpoint: path,
        // Tier 0 and no provider until a handler records what served the request, so that
        // rejected requests are not counted as local traffic.
        tier: 0,
        ..Default::default()
    };
    let handle = AuditHandle::new(sink, record);
    request.extensions_mut().insert(handle.clone());

    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    let error = response.extensions().get::<error::ErrorMessage>().map(|m| m.0.clone());
    handle.update(|record| {
        record.status = status;
        record.error = error;
    });
    // NOTE: a stream's cost is known only when it ends, after the headers are sent. So streamed
    // responses carry no cost header, and only the audit record and the metrics have it.
    if !is_event_stream(&response) {
        if let Ok(value) = HeaderValue::from_str(&format!("{:.9}", handle.cost_usd())) {
            response.headers_mut().insert(COST_HEADER.clone(), value);
        }
    }
    response
}

/// Header with the cost of a non-streamed inference request, in USD.
static COST_HEADER: HeaderName = HeaderName::from_static("x-tierd-cost-usd");

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Metadata key whose value names the request's workflow.
const WORKFLOW_METADATA_KEY: &str = "workflow";

/// Sets the record's workflow from the body when no `X-Tierd-Workflow` header set it: the
/// `workflow` metadata value, or else the OpenAI `user` field.
pub(super) fn tag_workflow(audit: &AuditHandle, metadata: Option<&HashMap<String, String>>, user: Option<&str>) {
    let tag = metadata
        .and_then(|m| m.get(WORKFLOW_METADATA_KEY))
        .map(String::as_str)
        .or(user)
        .filter(|tag| !tag.is_empty())
        .map(|tag| tag.chars().take(MAX_WORKFLOW_CHARS).collect::<String>());
    audit.update(|record| {
        if record.workflow.is_none() {
            record.workflow = tag;
        }
    });
}

pub(super) fn unix_time_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
