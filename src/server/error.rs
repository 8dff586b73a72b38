//! API errors in OpenAI's shape, with the HTTP status each deserves.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::openai::error_body;
use crate::error::HearthError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    pub fn shutting_down() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: Some("shutting_down"),
        }
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
            HearthError::QueueFull(_) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message,
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            HearthError::EngineStopped => Self::shutting_down(),
            _ => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message,
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = error_body(&self.message, self.kind, self.param, self.code);
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
