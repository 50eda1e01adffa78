//! Reading a JSON body into typed requests with OpenAI-style errors: invalid JSON, wrong types
//! (naming the field), and bodies over the size limit.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request body parsed as JSON, to be read into one or more typed views with [`JsonBody::read`].
pub struct JsonBody(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req.extensions().get::<BodyLimit>().map_or(usize::MAX, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
        if !matches!(value, serde_json::Value::Object(_)) {
            return Err(ApiError::bad_request("The request body must be a JSON object."));
        }
        Ok(JsonBody(value))
    }
}

impl JsonBody {
    /// Deserializes the body as `T`; a wrong type is reported with the field's path as `param`.
    pub fn read<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(&self.0).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            if path == "." {
                // serde names a missing field only in its message: "missing field `messages`".
                match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                    Some(field) => ApiError::invalid(field, format!("`{field}` is required.")),
                    None => ApiError::bad_request(message),
                }
            } else {
                ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {message}"))
            }
        })
    }
}

/// The body size limit, put in request extensions so the extractor can name it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);
