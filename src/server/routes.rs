//! HTTP handlers: parse, validate (before any tokenization), tokenize on the blocking pool, then
//! `generate` runs the request.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;

use super::error::ApiError;
use super::generate::{self, Job};
use super::openai::{ChatRequest, CompletionRequest, ModelCard, ModelList};
use super::validate::{self, Input, Validated};
use super::AppState;
use crate::engine::EngineHandle;
use crate::telemetry::names;

/// The body as JSON of type T: a body over the size limit is a 413, anything malformed a 400.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the request body is too large")
        } else {
            ApiError::invalid(e.body_text(), None)
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

fn engine(state: &AppState, model: &str) -> Result<EngineHandle, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::shutting_down());
    }
    let engines = state
        .engines
        .get()
        .ok_or_else(|| ApiError::unavailable("not_ready", "models are still loading"))?;
    engines
        .iter()
        .find(|(name, _)| name == model)
        .map(|(_, e)| e.clone())
        .ok_or_else(|| ApiError::model_not_found(model))
}

/// The prompts' token ids, computed on the blocking pool (never on the reactor threads), at most
/// `tokenize_permits` requests at a time.
async fn tokenize(
    state: &AppState,
    req: &Validated,
    engine: &EngineHandle,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let _permit = state
        .tokenize_permits
        .acquire()
        .await
        .map_err(|_| ApiError::shutting_down())?;
    let input = req.input.clone();
    let e = engine.clone();
    let ids = tokio::task::spawn_blocking(move || -> crate::Result<Vec<Vec<u32>>> {
        match input {
            Input::Chat(messages) => {
                let text = e.chat_template.render_marked(&messages)?;
                Ok(vec![e.tokenizer.encode_chat(&text)?])
            }
            Input::Prompts(ps) => ps.iter().map(|p| e.tokenizer.encode(p)).collect(),
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    metrics::counter!(names::TOKENIZED_REQUESTS, "model" => req.model.clone()).increment(1);
    Ok(ids)
}

/// Validated -> model checks -> tokens -> the response (SSE map or JSON fold).
async fn run(state: Arc<AppState>, req: Validated, started: Instant) -> Result<Response, ApiError> {
    let engine = engine(&state, &req.model)?;
    if let Err(e) = validate::check_model(&req, &engine) {
        metrics::counter!(names::REJECTED_REQUESTS, "code" => e.code.unwrap_or("invalid"))
            .increment(1);
        return Err(e);
    }
    let prompts = tokenize(&state, &req, &engine).await?;
    let stream = req.stream;
    let job = Job {
        req,
        prompts,
        engine,
        started,
    };
    if stream {
        let events = generate::stream(job)?
            .map(|data| Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)));
        Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        Ok(Json(generate::complete(job).await?).into_response())
    }
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req = validate::chat(parse::<ChatRequest>(body)?, &state.limits)?;
    run(state, req, started).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req = validate::completion(parse::<CompletionRequest>(body)?, &state.limits)?;
    run(state, req, started).await
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let data = state
        .engines
        .get()
        .map(|e| {
            e.iter()
                .map(|(name, _)| ModelCard {
                    id: name.clone(),
                    object: "model",
                    created: state.created,
                    owned_by: "hearth",
                })
                .collect()
        })
        .unwrap_or_default();
    Json(ModelList {
        object: "list",
        data,
    })
}

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.engines.get().is_some() && !state.shutting_down.load(Ordering::Relaxed) {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading" })),
        )
            .into_response()
    }
}

/// Prometheus text: engine gauges are read at scrape time from the same counters the engine keeps.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(engines) = state.engines.get() {
        for (name, e) in engines {
            let labels = [("model", name.clone())];
            let s = e.stats();
            metrics::gauge!(names::REQUESTS_RUNNING, &labels).set(s.running as f64);
            metrics::gauge!(names::REQUESTS_WAITING, &labels).set(s.waiting as f64);
            metrics::gauge!(names::KV_BLOCKS_TOTAL, &labels).set(s.total_blocks as f64);
            metrics::gauge!(names::KV_BLOCKS_FREE, &labels).set(s.free_blocks as f64);
            metrics::gauge!(names::KV_BLOCKS_CACHED, &labels).set(s.cached_blocks as f64);
            metrics::gauge!(names::KV_CACHE_USAGE, &labels)
                .set(1.0 - s.free_blocks as f64 / s.total_blocks.max(1) as f64);
            metrics::counter!(names::PREFIX_QUERIES, &labels).absolute(s.prefix_query_tokens);
            metrics::counter!(names::PREFIX_HITS, &labels).absolute(s.prefix_hit_tokens);
            metrics::counter!(names::PREEMPTIONS, &labels).absolute(s.preemptions);
            metrics::counter!(names::ENGINE_STEPS, &labels).absolute(s.steps);
            metrics::counter!(names::ENGINE_DEVICE_TIME, &labels).absolute(s.device_micros);
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::http(StatusCode::NOT_FOUND, "no such endpoint")
}
