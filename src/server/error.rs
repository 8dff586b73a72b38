//! API errors in OpenAI's shape, with the HTTP status each deserves: the request's fault is 4xx
//! (invalid 400, unknown model 404, too large 413, wrong media type 415, over capacity 429), the
//! server's is 5xx (a failed engine step 500, shutting down or not ready 503).
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::openai::ErrorResponse;
use crate::error::HearthError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// `Retry-After` for a 429 or 503 (one second when unset).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, m: String) -> Self {
        Self {
            status,
            message: m,
            kind,
            param: None,
            code,
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                message.into(),
            )
        }
    }

    /// A request field Hearth does not support (yet): refused rather than ignored.
    pub fn unsupported(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some("unsupported_parameter"),
            ..Self::invalid(message, Some(param))
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{model}` does not exist"),
            )
        }
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            message.into(),
        )
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some(code),
            message.into(),
        )
    }

    /// A missing or unknown API key (OpenAI's shape and code).
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Missing or incorrect API key: send `Authorization: Bearer <key>` with a key \
             configured for your tenant"
                .into(),
        )
    }

    /// Over one of the tenant's limits: 429 naming it, with the time until a retry can pass.
    pub fn rate_limited(r: crate::tenancy::limits::Refusal) -> Self {
        Self {
            retry_after: Some(r.retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                r.message,
            )
        }
    }

    /// A valid key that may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            Some("insufficient_permissions"),
            message.into(),
        )
    }

    pub fn shutting_down() -> Self {
        Self::unavailable("shutting_down", "the server is shutting down")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            message.into(),
        )
    }

    /// An error the HTTP layer produced (no route, wrong method, bad media type, ...).
    pub fn http(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::URI_TOO_LONG => "uri_too_long",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            StatusCode::FORBIDDEN => "invalid_host",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request",
        };
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Self::new(status, kind, Some(code), message.into())
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse::new(&self.message, self.kind, self.param, self.code)
    }
}

impl From<HearthError> for ApiError {
    fn from(e: HearthError) -> Self {
        let message = e.to_string();
        match e {
            HearthError::ContextLength { .. } | HearthError::KvCapacity { .. } => Self {
                code: Some("context_length_exceeded"),
                ..Self::invalid(message, Some("messages"))
            },
            HearthError::InvalidRequest(_)
            | HearthError::Tokenizer(_)
            | HearthError::ChatTemplate(_) => Self::invalid(message, None),
            HearthError::QueueFull(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
                message,
            ),
            HearthError::EngineStopped => Self::unavailable("engine_stopped", message),
            HearthError::LedgerUnavailable(_) => {
                // The caller (a tenant, maybe) learns that the ledger is unavailable; which
                // database and why go to the log.
                tracing::warn!(error = %message, "usage query failed");
                Self::unavailable(
                    "ledger_unavailable",
                    "the usage ledger's database cannot be queried now; retry later",
                )
            }
            _ => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            // Whole seconds, rounded up (a retry sooner would be refused again).
            let secs = self
                .retry_after
                .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                .max(1);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request's faults are 4xx, the server's 5xx; 429 and 503 tell the client when to retry.
    #[test]
    fn engine_errors_map_to_the_status_they_deserve() {
        let cases = [
            (HearthError::InvalidRequest("x".into()), 400, None),
            (
                HearthError::KvCapacity {
                    needed: 10,
                    total: 5,
                },
                400,
                Some("context_length_exceeded"),
            ),
            (HearthError::QueueFull(3), 429, Some("queue_full")),
            (
                HearthError::Internal("step failed".into()),
                500,
                Some("internal_error"),
            ),
            (HearthError::EngineStopped, 503, Some("engine_stopped")),
        ];
        for (e, status, code) in cases {
            let api = ApiError::from(e);
            assert_eq!(api.status.as_u16(), status, "{}", api.message);
            assert_eq!(api.code, code);
            let resp = api.into_response();
            let retry = resp.headers().get(header::RETRY_AFTER).is_some();
            assert_eq!(retry, status == 429 || status == 503);
        }
    }
}
