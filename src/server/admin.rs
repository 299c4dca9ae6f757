//! The admin API, behind `[[admin_token]]` bearer tokens: read the live policy, change a task's
//! threshold or a route's criteria, and list the history of changes.
//!
//! A change is written into the config file, keeping its comments and layout, and then
//! reloaded like any edit of the file, so the file stays the one source of the policy and the
//! change survives a restart. A change that the reload rejects is undone in the file. Every
//! change is recorded in the audit store with the token's name.

use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use toml_edit::{DocumentMut, Item};

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::policy::reload::{reload, Reloaded};
use crate::routing::config::{ConfidenceMetric, PiiPolicy, RouteMode};

/// Name of the admin token that authenticated a request.
#[derive(Debug, Clone)]
pub struct AdminName(pub String);

/// Most history entries returned by one request.
const MAX_HISTORY: usize = 1000;

/// Checks the admin token of every `/admin/` request: 403 when none is configured, 401 when it
/// is missing or unknown.
pub async fn authenticate_admin(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let policy = state.policy();
    if !policy.admin_tokens.required() {
        let mut error = ApiError::invalid_request(
            "The admin API is disabled; add an [[admin_token]] table to the config to enable it.",
            None,
        );
        error.status = axum::http::StatusCode::FORBIDDEN;
        return error.with_code("admin_api_disabled").into_response();
    }
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(super::auth::bearer_token);
    let Some(token) = token else {
        state.audit.metrics.unauthorized("missing");
        return ApiError::unauthorized("The admin API needs `Authorization: Bearer ADMIN_TOKEN`.", "missing_api_key")
            .into_response();
    };
    let Some(name) = policy.admin_tokens.name_of(token) else {
        state.audit.metrics.unauthorized("invalid");
        tracing::warn!("rejected an admin request with an unknown token");
        return ApiError::unauthorized("Incorrect admin token provided.", "invalid_api_key").into_response();
    };
    request.extensions_mut().insert(AdminName(name.to_string()));
    next.run(request).await
}

/// `GET /admin/policy`: the thresholds and route criteria in force.
pub async fn show_policy(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    let policy = state.policy();
    let mut tasks: Vec<(&String, &f64)> = policy.thresholds.iter().collect();
    tasks.sort_by(|a, b| a.0.cmp(b.0));
    let mut routes: Vec<_> = policy.routes.values().map(|route| &route.config).collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    axum::Json(json!({
        "generation": policy.generation,
        "config_file": state.config_source.as_ref().map(|s| s.path.display().to_string()),
        "tasks": tasks.into_iter().map(|(name, threshold)| json!({"name": name, "threshold": threshold})).collect::<Vec<_>>(),
        "routes": routes.into_iter().map(|route| json!({
            "name": route.name,
            "mode": route.mode,
            "local": route.local,
            "tier2": route.tier2,
            "tier1": route.tier1,
            "threshold": route.threshold,
            "confidence": route.confidence,
            "pii": route.pii,
            "local_fallback": route.local_fallback,
        })).collect::<Vec<_>>(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdChange {
    pub threshold: f64,
}

/// `PUT /admin/tasks/{task}/threshold`.
pub async fn set_task_threshold(
    State(state): State<Arc<AppState>>,
    Extension(admin): Extension<AdminName>,
    UrlPath(task): UrlPath<String>,
    ApiJson(change): ApiJson<ThresholdChange>,
) -> Result<Response, ApiError> {
    check_unit_interval(change.threshold, "threshold")?;
    let threshold = change.threshold;
    let edit = move |document: &mut DocumentMut| -> Result<(), ApiError> {
        let entry = find_entry(document, "task", &task).ok_or_else(|| {
            ApiError::not_found(
                format!(
                    "The config file has no [[task]] named `{task}`. A built-in task's threshold changes once its \
                     table is copied into the config file; GET /v1/tasks lists the tasks."
                ),
                "task",
                "task_not_found",
            )
        })?;
        set_keeping_comment(entry, "threshold", threshold.into());
        Ok(())
    };
    apply(&state, &admin.0, edit).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteChange {
    pub threshold: Option<f64>,
    pub confidence: Option<ConfidenceMetric>,
    pub mode: Option<RouteMode>,
    pub pii: Option<PiiPolicy>,
    pub local_fallback: Option<bool>,
}

/// `PATCH /admin/routes/{route}`: changes the given criteria and keeps the others.
pub async fn change_route(
    State(state): State<Arc<AppState>>,
    Extension(admin): Extension<AdminName>,
    UrlPath(route): UrlPath<String>,
    ApiJson(change): ApiJson<RouteChange>,
) -> Result<Response, ApiError> {
    if let Some(threshold) = change.threshold {
        check_unit_interval(threshold, "threshold")?;
    }
    let mut fields: Vec<(&'static str, toml_edit::Value)> = Vec::new();
    if let Some(threshold) = change.threshold {
        fields.push(("threshold", threshold.into()));
    }
    for (field, value) in [
        ("confidence", change.confidence.map(|v| json!(v))),
        ("mode", change.mode.map(|v| json!(v))),
        ("pii", change.pii.map(|v| json!(v))),
    ] {
        if let Some(Value::String(text)) = value {
            fields.push((field, text.into()));
        }
    }
    if let Some(local_fallback) = change.local_fallback {
        fields.push(("local_fallback", local_fallback.into()));
    }
    if fields.is_empty() {
        return Err(ApiError::invalid_request(
            "The body changes nothing; set one or more of threshold, confidence, mode, pii and local_fallback.",
            None,
        ));
    }
    let edit = move |document: &mut DocumentMut| -> Result<(), ApiError> {
        let entry = find_entry(document, "route", &route).ok_or_else(|| {
            ApiError::not_found(
                format!("The config file has no [[route]] named `{route}`; GET /admin/policy lists the routes."),
                "route",
                "route_not_found",
            )
        })?;
        for (field, value) in fields {
            set_keeping_comment(entry, field, value);
        }
        Ok(())
    };
    apply(&state, &admin.0, edit).await
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    pub limit: Option<usize>,
}

/// `GET /admin/history?limit=N`: the latest changes, newest first.
pub async fn history(
    State(state): State<Arc<AppState>>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::invalid_request(rejection.body_text(), Some("limit")))?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::invalid_request(
            format!("Invalid value for `limit`: {limit}; it must be from 1 to {MAX_HISTORY}."),
            Some("limit"),
        ));
    }
    let reading = state.clone();
    let changes = tokio::task::spawn_blocking(move || {
        let history = reading.history.as_ref().ok_or_else(history_disabled)?;
        let store = history.lock().unwrap_or_else(|p| p.into_inner());
        store.policy_changes(limit).map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(axum::Json(json!({"object": "list", "data": changes})))
}

fn history_disabled() -> ApiError {
    let mut error = ApiError::invalid_request(
        "The audit trail is disabled (`[audit] enabled = false`), so no history is kept.",
        None,
    );
    error.status = axum::http::StatusCode::CONFLICT;
    error.with_code("history_disabled")
}

fn check_unit_interval(value: f64, param: &str) -> Result<(), ApiError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            format!("Invalid value for `{param}`: {value}; it must be from 0 to 1."),
            Some(param),
        ))
    }
}

/// Sets `field` of `entry` to `value`, keeping the whitespace and comment around the old value,
/// so that `threshold = 0.9  # set by the support team` keeps its comment.
fn set_keeping_comment(entry: &mut toml_edit::Table, field: &str, mut value: toml_edit::Value) {
    if let Some(old) = entry.get(field).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
    }
    entry[field] = Item::Value(value);
}

/// Returns the `[[table]]` entry whose `name` is `name`.
fn find_entry<'a>(document: &'a mut DocumentMut, table: &str, name: &str) -> Option<&'a mut toml_edit::Table> {
    document
        .get_mut(table)?
        .as_array_of_tables_mut()?
        .iter_mut()
        .find(|entry| entry.get("name").and_then(Item::as_str) == Some(name))
}

/// Edits the config file with `edit`, reloads it, and records the changes for `actor`. The
/// file is restored when the reload rejects it.
async fn apply(
    state: &Arc<AppState>,
    actor: &str,
    edit: impl FnOnce(&mut DocumentMut) -> Result<(), ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    let applying = state.clone();
    let actor = actor.to_string();
    let reloaded = tokio::task::spawn_blocking(move || -> Result<Reloaded, ApiError> {
        let source = applying.config_source.as_ref().ok_or_else(no_config_file)?;
        let _one_at_a_time = applying.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let original = std::fs::read_to_string(&source.path).map_err(|e| {
            conflict(
                format!("The config file {} cannot be read: {e}", source.path.display()),
                "config_not_readable",
            )
        })?;
        let mut document: DocumentMut = original.parse().map_err(|e| {
            conflict(format!("The config file does not parse, so it cannot be edited: {e}"), "invalid_config_file")
        })?;
        edit(&mut document)?;
        write_file(&source.path, &document.to_string())?;
        match reload(&applying) {
            Ok(reloaded) => {
                let _ = applying.record_changes(&actor, &reloaded);
                tracing::info!(actor, changes = reloaded.changes.len(), generation = reloaded.generation, "policy changed through the admin API");
                Ok(reloaded)
            }
            Err(error) => {
                write_file(&source.path, &original)?;
                Err(ApiError::invalid_request(format!("The change was rejected and undone: {error}"), None)
                    .with_code("invalid_policy"))
            }
        }
    })
    .await
    .map_err(ApiError::internal)??;

    let changes: Vec<Value> = reloaded
        .changes
        .iter()
        .map(|change| {
            json!({
                "setting": change.setting,
                "old_value": serde_json::from_str::<Value>(&change.old_value).unwrap_or(Value::Null),
                "new_value": serde_json::from_str::<Value>(&change.new_value).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(axum::Json(json!({"generation": reloaded.generation, "changes": changes})).into_response())
}

/// Replaces the file's content through a temporary file and a rename, so that the file watcher
/// never reads half of it. A symbolic link is followed, so the file it points to changes and the
/// link stays, and the new file gets the old one's permissions and owner.
fn write_file(path: &Path, text: &str) -> Result<(), ApiError> {
    let failed = |e: std::io::Error| {
        conflict(format!("The config file {} cannot be written: {e}", path.display()), "config_not_writable")
    };
    let target = std::fs::canonicalize(path).map_err(failed)?;
    let metadata = std::fs::metadata(&target).map_err(failed)?;
    let temporary = target.with_extension("toml.tierd-edit");
    std::fs::write(&temporary, text).map_err(failed)?;
    let finished = std::fs::set_permissions(&temporary, metadata.permissions())
        .and_then(|()| keep_owner(&temporary, &metadata))
        .and_then(|()| std::fs::rename(&temporary, &target));
    if let Err(error) = finished {
        let _ = std::fs::remove_file(&temporary);
        return Err(failed(error));
    }
    Ok(())
}

#[cfg(unix)]
fn keep_owner(path: &Path, original: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let current = std::fs::metadata(path)?;
    if (current.uid(), current.gid()) == (original.uid(), original.gid()) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(original.uid()), Some(original.gid()))
}

#[cfg(not(unix))]
fn keep_owner(_path: &Path, _original: &std::fs::Metadata) -> std::io::Result<()> {
    Ok(())
}

fn no_config_file() -> ApiError {
    conflict(
        "tierd was started without --config, so there is no file to keep the change in.".into(),
        "no_config_file",
    )
}

fn conflict(message: String, code: &'static str) -> ApiError {
    let mut error = ApiError::invalid_request(message, None);
    error.status = axum::http::StatusCode::CONFLICT;
    error.with_code(code)
}
