//! `POST /v1/completions/render` and `/v1/chat/completions/render`: the token ids a request would
//! run, for a router's precise prefix scoring (the Gateway API Inference Extension's model-server
//! protocol). The body is the matching endpoint's, validated the same way; a route group is
//! resolved as it would be for the request (rules, then the load check), to the model that would
//! run it first.
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::openai::{ChatRequest, CompletionRequest, ErrorResponse};
use super::routes::{parse, resolve, tenant_of};
use super::validate::{self, Validated};
use super::AppState;
use crate::telemetry::trace::Trace;
use crate::tenancy::Caller;

/// The token ids of a request's prompt, after the chat template.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rendered {
    /// The (first) prompt's ids, exactly as the engine would run them.
    pub token_ids: Vec<u32>,
    /// The model whose tokenizer made them.
    pub model: String,
    /// Every prompt's ids, when a completion request has several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<Vec<u32>>>,
}

async fn render<R: serde::de::DeserializeOwned>(
    state: Arc<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    validate: fn(R, &validate::Limits) -> Result<Validated, ApiError>,
) -> Result<Json<Rendered>, ApiError> {
    let (tenant, _) = tenant_of(caller)?;
    // Tokenizing takes the shared tokenizer permits: a tenant over its limits may not.
    let _admission = state
        .limiter
        .admit(&tenant, 0)
        .map_err(ApiError::rate_limited)?;
    let req = validate(parse::<R>(&state, &headers, body).await?, &state.limits)?;
    let (engine, mut prompts, _) = resolve(&state, &req, &tenant, &Trace::off()).await?;
    let several = prompts.len() > 1;
    let token_ids = prompts.first().cloned().unwrap_or_default();
    if !several {
        prompts.clear();
    }
    Ok(Json(Rendered {
        token_ids,
        model: engine.name.clone(),
        prompts: several.then_some(prompts),
    }))
}

/// The token ids a chat completion request would run (after the chat template).
#[utoipa::path(post, path = "/v1/chat/completions/render", operation_id = "render_chat", request_body = ChatRequest,
    responses((status = 200, body = Rendered),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Rendered>, ApiError> {
    render(state, caller, headers, body, validate::chat).await
}

/// The token ids a text completion request would run.
#[utoipa::path(post, path = "/v1/completions/render", operation_id = "render_completion", request_body = CompletionRequest,
    responses((status = 200, body = Rendered),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn completion(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Rendered>, ApiError> {
    render(state, caller, headers, body, validate::completion).await
}
