//! HTTP handlers: request parsing and validation, then `generate` does the work.
use std::convert::Infallible;
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
use serde_json::json;

use super::error::ApiError;
use super::generate::{self, Job, Kind};
use super::openai::{ChatRequest, CompletionRequest, Content, Sampling};
use super::AppState;
use crate::engine::{EngineHandle, SamplingParams};
use crate::model::ChatMessage;
use crate::telemetry::names;

/// The body as JSON of type T: a body over the size limit is a 413, anything malformed a 400.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: "the request body is too large".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
            }
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
    let engines = state.engines.get().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "models are still loading".into(),
        kind: "server_error",
        param: None,
        code: Some("not_ready"),
    })?;
    engines
        .iter()
        .find(|(name, _)| name == model)
        .map(|(_, e)| e.clone())
        .ok_or_else(|| ApiError::model_not_found(model))
}

fn sampling_params(
    s: &Sampling,
    logprobs: Option<usize>,
) -> Result<(SamplingParams, usize), ApiError> {
    let n = s.n.unwrap_or(1) as usize;
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid("n must be between 1 and 16", Some("n")));
    }
    let max_tokens = s.max_completion_tokens.or(s.max_tokens).map(|m| m as usize);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0) as usize,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        seed: s.seed,
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs,
    };
    params.validate().map_err(ApiError::from)?;
    Ok((params, n))
}

async fn respond(job: Job, stream: bool, want_logprobs: bool) -> Result<Response, ApiError> {
    if stream {
        let rx = generate::stream(job, want_logprobs)?;
        let events = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|data| (Ok::<_, Infallible>(SseEvent::default().data(data)), rx))
        });
        Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        Ok(Json(generate::complete(job, want_logprobs).await?).into_response())
    }
}

/// Validate the sampling fields shared by both endpoints, then run the job.
async fn run(
    kind: Kind,
    model: String,
    engine: EngineHandle,
    prompts: Vec<Vec<u32>>,
    mut sampling: Sampling,
    logprobs: Option<usize>,
    started: Instant,
) -> Result<Response, ApiError> {
    let stops = stops(&mut sampling)?;
    let (params, n) = sampling_params(&sampling, logprobs)?;
    let job = Job {
        kind,
        model,
        prompts,
        n,
        params,
        stops,
        include_usage: sampling
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        tenant: sampling.user.clone(),
        started,
        engine,
    };
    respond(job, sampling.stream.unwrap_or(false), logprobs.is_some()).await
}

fn stops(s: &mut Sampling) -> Result<Vec<String>, ApiError> {
    let v = s.stop.take().map(|x| x.into_vec()).unwrap_or_default();
    if v.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
    }
    Ok(v)
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: ChatRequest = parse(body)?;
    let engine = engine(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("unsupported message role `{other}`"),
                    Some("messages"),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("unsupported content part `{}`", p.kind),
                                Some("messages"),
                            ))
                        }
                    }
                }
                out
            }
        };
        messages.push(ChatMessage::new(role, &content));
    }
    let top = match (req.logprobs, req.top_logprobs) {
        (Some(true), t) => Some(t.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs to be true",
                Some("top_logprobs"),
            ))
        }
        _ => None,
    };
    let text = engine.chat_template.render(&messages)?;
    let prompt = engine.tokenizer.encode(&text)?;
    run(
        Kind::Chat,
        req.model,
        engine,
        vec![prompt],
        req.sampling,
        top,
        started,
    )
    .await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: CompletionRequest = parse(body)?;
    let engine = engine(&state, &req.model)?;
    let texts = req.prompt.into_vec();
    if texts.is_empty() || texts.iter().any(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let prompts = texts
        .iter()
        .map(|t| engine.tokenizer.encode(t))
        .collect::<crate::Result<Vec<_>>>()?;
    let top = req.logprobs.map(|n| n as usize);
    run(
        Kind::Completion,
        req.model,
        engine,
        prompts,
        req.sampling,
        top,
        started,
    )
    .await
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .engines
        .get()
        .map(|e| {
            e.iter()
                .map(|(name, _)| json!({ "id": name, "object": "model", "created": state.created, "owned_by": "hearth" }))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({ "object": "list", "data": data }))
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
            let s = &e.stats;
            metrics::gauge!(names::REQUESTS_RUNNING, &labels)
                .set(s.running.load(Ordering::Relaxed) as f64);
            metrics::gauge!(names::REQUESTS_WAITING, &labels)
                .set(s.waiting.load(Ordering::Relaxed) as f64);
            let total = e.total_blocks();
            let free = e.free_blocks();
            metrics::gauge!(names::KV_BLOCKS_TOTAL, &labels).set(total as f64);
            metrics::gauge!(names::KV_BLOCKS_FREE, &labels).set(free as f64);
            metrics::gauge!(names::KV_BLOCKS_CACHED, &labels).set(e.cached_blocks() as f64);
            metrics::gauge!(names::KV_CACHE_USAGE, &labels)
                .set(1.0 - free as f64 / total.max(1) as f64);
            metrics::counter!(names::PREFIX_QUERIES, &labels)
                .absolute(s.prefix_query_tokens.load(Ordering::Relaxed));
            metrics::counter!(names::PREFIX_HITS, &labels)
                .absolute(s.prefix_hit_tokens.load(Ordering::Relaxed));
            metrics::counter!(names::PREEMPTIONS, &labels)
                .absolute(s.preemptions.load(Ordering::Relaxed));
            metrics::counter!(names::ENGINE_STEPS, &labels)
                .absolute(s.steps.load(Ordering::Relaxed));
            metrics::counter!(names::ENGINE_DEVICE_TIME, &labels)
                .absolute(s.device_micros.load(Ordering::Relaxed));
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
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    }
}
