//! The `authenticate` middleware: when client keys are configured, every endpoint but
//! `/health` requires `Authorization: Bearer KEY`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::audit::handle::AuditHandle;

/// Checks the request's key, rejects it with 401 when it is missing or unknown, and records the
/// key's name in the audit record.
pub async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let policy = state.policy();
    // The admin API has tokens of its own.
    let path = request.uri().path();
    if !policy.client_keys.required() || path == "/health" || path.starts_with("/admin/") {
        return next.run(request).await;
    }
    let header = request.headers().get(AUTHORIZATION).map(|value| value.to_str());
    let key = match header {
        None => return reject(&state, "missing", "You didn't provide an API key; send it as `Authorization: Bearer KEY`.", "missing_api_key"),
        Some(Err(_)) => return reject(&state, "invalid", "The Authorization header is not valid text.", "invalid_api_key"),
        Some(Ok(value)) => match bearer_token(value) {
            Some(key) => key,
            None => {
                return reject(
                    &state,
                    "invalid",
                    "The Authorization header must have the form `Bearer KEY`.",
                    "invalid_api_key",
                )
            }
        },
    };
    let Some(name) = policy.client_keys.name_of(key) else {
        return reject(&state, "invalid", "Incorrect API key provided.", "invalid_api_key");
    };
    if let Some(audit) = request.extensions().get::<AuditHandle>() {
        let name = name.to_string();
        audit.update(|record| record.client = Some(name));
    }
    next.run(request).await
}

/// Returns the key of a `Bearer KEY` header value; the scheme is case-insensitive (RFC 7235).
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// Counts and logs a rejected request, and returns its 401. The key is never logged.
fn reject(state: &AppState, reason: &str, message: &str, code: &'static str) -> Response {
    state.audit.metrics.unauthorized(reason);
    tracing::warn!(reason, "rejected a request without a valid client key");
    ApiError::unauthorized(message, code).into_response()
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer_token("Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer_token("bearer   sk-1 "), Some("sk-1"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("sk-1"), None);
    }
}
