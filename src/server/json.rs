//! A JSON body extractor whose rejections are OpenAI-style errors. It returns 415 for a wrong
//! Content-Type, 413 for an oversized body, and 400 naming the field for malformed JSON or wrong
//! types. axum's own `Json` returns 422 for wrong types, which OpenAI clients do not expect.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::openai::GenerationFields;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mime = content_type.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            let shown = if content_type.is_empty() { "none" } else { &content_type };
            return Err(ApiError::unsupported_media_type(shown));
        }

        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |limit| limit.0);
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid_request(format!("Failed to read the body: {rejection}"), None)
            }
        })?;

        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') {
            return Err(ApiError::invalid_request("The request body must be a JSON object.", None));
        }

        let deserializer = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut *deserializer) {
            Ok(value) => {
                deserializer.end().map_err(|error| {
                    ApiError::invalid_request(format!("The body is not valid JSON: {error}"), None)
                })?;
                Ok(Self(value))
            }
            Err(error) => {
                let mut path = error.path().to_string();
                let mut inner = error.into_inner();
                if path == "." && !inner.is_syntax() && !inner.is_eof() {
                    if let Some((field_path, field_error)) = generation_field_error(&bytes) {
                        path = field_path;
                        inner = field_error;
                    }
                }
                let (message, param) = if inner.is_syntax() || inner.is_eof() {
                    (format!("The body is not valid JSON: {inner}"), None)
                } else if path == "." {
                    (format!("Invalid request body: {inner}"), None)
                } else {
                    (format!("Invalid value for `{path}`: {inner}"), Some(path))
                };
                Err(ApiError::invalid_request(message, param.as_deref()))
            }
        }
    }
}

/// Finds a wrong value among the fields that both request types take from `GenerationFields`.
///
/// Those fields are `#[serde(flatten)]`ed, and serde deserializes a flattened struct from a
/// buffer that serde_path_to_error cannot see into, so their errors come back with the root
/// path `.` and no field name. `GenerationFields` ignores unknown keys and defaults every field,
/// so deserializing it alone from the whole body fails only on its own fields, with their path.
fn generation_field_error(bytes: &[u8]) -> Option<(String, serde_json::Error)> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    let error = serde_path_to_error::deserialize::<_, GenerationFields>(deserializer).err()?;
    let path = error.path().to_string();
    (path != ".").then(|| (path, error.into_inner()))
}

/// The configured body limit, made visible to the extractor for its error message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);
