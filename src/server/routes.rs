//! HTTP handlers: parse, validate (before any tokenization), tokenize on the blocking pool, then
//! `generate` runs the request.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use opentelemetry::KeyValue;
use serde_json::json;

use super::billing::Receipt;
use super::error::ApiError;
use super::generate::{self, Job};
use super::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Completion, CompletionRequest, ErrorResponse,
    ModelCard, ModelList, UsageList, UsageParams,
};
use super::tools::{self, Tools};
use super::validate::{self, Input, Validated};
use super::AppState;
use crate::engine::EngineHandle;
use crate::ledger::{GroupBy, UsageQuery};
use crate::router::Policy;
use crate::telemetry::names;
use crate::telemetry::trace::Trace;
use crate::tenancy::{Caller, Tenant};

/// The body as JSON of type T: a body over the size limit is a 413 (see `http::read_body`),
/// anything malformed a 400.
pub(super) async fn parse<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = super::http::read_body(&state.http, headers, body).await?;
    serde_json::from_slice(&bytes)
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
    if let Some((_, e)) = engines.iter().find(|(name, _)| name == model) {
        return Ok(e.clone());
    }
    if state
        .embedders
        .get()
        .is_some_and(|e| e.iter().any(|h| h.name == model))
    {
        return Err(ApiError::invalid(
            format!("`{model}` is an embedding model: it is served at /v1/embeddings"),
            Some("model"),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// The model-specific checks (context length, vocabulary), counted when they refuse.
fn checked(req: &Validated, engine: &EngineHandle) -> Result<(), ApiError> {
    validate::check_model(req, engine).inspect_err(|e| {
        metrics::counter!(names::REJECTED_REQUESTS, "code" => e.code.unwrap_or("invalid"))
            .increment(1);
    })
}

/// The model that runs a request first, its prompts in that model's tokens, and, for a route
/// group, the plan of models to escalate to.
type Resolved = (
    EngineHandle,
    Vec<Vec<u32>>,
    Option<super::cascade::RoutePlan>,
);

/// A request to a route group: the group's models that can take it (a prompt too long for the
/// small model's context goes to the next), each with the prompts in its own tokens; the first
/// runs, the others are the cascade's to escalate to.
async fn routed(
    state: &AppState,
    req: &Validated,
    tenant: &Tenant,
    group: crate::router::Group,
) -> Result<Resolved, ApiError> {
    let mut candidates = Vec::new();
    let mut refusal = None;
    let engines = group
        .models
        .iter()
        .map(|name| engine(state, name))
        .collect::<Result<Vec<_>, _>>()?;
    // A chat request goes only to models that came with a chat template, when the group has any:
    // one without is a base model, which continues a chat transcript instead of answering it.
    let chat_only =
        matches!(req.input, Input::Chat(_)) && engines.iter().any(|e| e.chat_template.is_native());
    for engine in engines {
        if chat_only && !engine.chat_template.is_native() {
            continue;
        }
        match checked(req, &engine) {
            Ok(()) => candidates.push(engine),
            Err(e) => refusal = refusal.or(Some(e)),
        }
    }
    let mut tokenized = Vec::with_capacity(candidates.len());
    for engine in candidates {
        let prompts = tokenize(state, req, &engine).await?;
        tokenized.push((engine, prompts));
    }
    if tokenized.is_empty() {
        return Err(refusal.unwrap_or_else(|| ApiError::model_not_found(&req.model)));
    }
    // Rules first: the first that matches picks the model (if it can take the request).
    let prompt_tokens: usize = tokenized[0].1.iter().map(Vec::len).sum();
    let rule = group
        .rule_for(&tenant.name, &validate::routing_text(req), prompt_tokens)
        .and_then(|(i, model)| {
            let at = tokenized.iter().position(|(e, _)| e.name == model)?;
            Some((i, at))
        });
    let (mut picked, mut tokenized) = match rule {
        Some((i, at)) => (Some(format!("rule_{i}")), vec![tokenized.swap_remove(at)]),
        None => (None, tokenized),
    };
    let mut load = Vec::new();
    if picked.is_none() {
        let target = group.ttft_target.filter(|_| group.policy != Policy::Rules);
        if let Some(target) = target {
            load = tokenized
                .iter()
                .map(|(e, p)| {
                    let tokens = p.iter().map(Vec::len).sum();
                    crate::router::load::estimate(&e.name, &e.load(), tokens, target)
                })
                .collect();
            let keep = crate::router::load::keep(&load);
            if keep.len() < tokenized.len() {
                tokenized = tokenized
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, t)| keep.contains(&i).then_some(t))
                    .collect();
                if tokenized.len() == 1 {
                    picked = Some("load".into());
                }
            }
        }
        if group.policy != Policy::Cascade && tokenized.len() > 1 {
            tokenized.truncate(1);
            picked = Some("first_model".into());
        }
    }
    let mut it = tokenized.into_iter();
    let Some((engine, prompts)) = it.next() else {
        return Err(ApiError::model_not_found(&req.model));
    };
    let watch = if req.stream { 0 } else { group.watch_tokens };
    let plan = super::cascade::RoutePlan {
        group,
        next: it.collect(),
        picked,
        load,
        watch,
    };
    Ok((engine, prompts, Some(plan)))
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
    let tools = req.tools.clone();
    let e = engine.clone();
    let ids = tokio::task::spawn_blocking(move || -> crate::Result<Vec<Vec<u32>>> {
        match input {
            Input::Chat(messages) => {
                let text = if e.chat_template.renders_tools() {
                    let tools = tools.as_ref().map(Tools::openai_json);
                    // The template writes tools and calls outside the content marks: no special
                    // token's text may come in through them.
                    let written = messages
                        .iter()
                        .filter_map(|m| m.tool_calls.as_ref())
                        .chain(tools.as_ref());
                    for v in written {
                        if let Some(s) = e.tokenizer.find_special(&v.to_string()) {
                            return Err(crate::HearthError::InvalidRequest(format!(
                                "tools and tool calls must not contain the special token `{s}`"
                            )));
                        }
                    }
                    e.chat_template.render_marked(&messages, tools.as_ref())?
                } else {
                    let messages = tools::generic_messages(&messages, tools.as_ref());
                    e.chat_template.render_marked(&messages, None)?
                };
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

/// The tenant an inference request runs as: admin keys read usage, they run no inference.
pub(super) fn tenant_of(caller: Caller) -> Result<(Arc<Tenant>, Arc<str>), ApiError> {
    match caller {
        Caller::Tenant { tenant, key_id } => Ok((tenant, key_id)),
        Caller::Admin { .. } => Err(ApiError::forbidden(
            "admin keys read usage and metrics; inference needs a tenant's key",
        )),
    }
}

/// Count an inference request under its tenant, model (only a served one: a made-up name must not
/// become a label) and HTTP status.
pub(super) fn count_request(state: &AppState, tenant: &Tenant, model: &str, status: StatusCode) {
    let served = state
        .engines
        .get()
        .is_some_and(|e| e.iter().any(|(n, _)| n == model))
        || state.routes.get().is_some_and(|r| r.get(model).is_some())
        || state
            .embedders
            .get()
            .is_some_and(|e| e.iter().any(|h| h.name == model));
    metrics::counter!(
        names::TENANT_REQUESTS,
        "tenant" => tenant.name.to_string(),
        "model" => if served { model.to_string() } else { String::new() },
        "status" => status.as_u16().to_string()
    )
    .increment(1);
}

/// A request refused before its model is known still counts, and is a ledger row, for its tenant.
pub(super) fn counted<T>(
    state: &AppState,
    tenant: &Tenant,
    receipt: &mut Receipt,
    r: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if let Err(e) = &r {
        count_request(state, tenant, "", e.status);
        receipt.refuse(e);
    }
    r
}

/// The ledger row of a request by this tenant, begun at its arrival.
pub(super) fn receipt(
    state: &AppState,
    headers: &HeaderMap,
    tenant: &Tenant,
    key_id: &str,
    started: Instant,
) -> Receipt {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let trace = state
        .tracing
        .as_ref()
        .map_or_else(Trace::off, |t| t.begin(headers, started));
    Receipt::new(
        state.ledger.clone(),
        tenant,
        key_id,
        request_id,
        started,
        trace,
        Some(state.errors.clone()),
    )
}

/// An inference route: the caller's tenant, a ledger row begun at arrival, the body parsed and
/// validated into a request (a refusal counted and written as a row), then `run`.
async fn infer<R: serde::de::DeserializeOwned>(
    state: Arc<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    validate: fn(R, &validate::Limits) -> Result<Validated, ApiError>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (tenant, key_id) = tenant_of(caller)?;
    let mut receipt = receipt(&state, &headers, &tenant, &key_id, started);
    let req = async {
        let directive = super::cached::directive(&headers)?;
        let req = validate(parse::<R>(&state, &headers, body).await?, &state.limits)?;
        Ok((req, directive))
    }
    .await;
    receipt
        .trace()
        .span("validate", None, started, Instant::now(), Vec::new);
    let (req, directive) = counted(&state, &tenant, &mut receipt, req)?;
    super::genai::asked(receipt.trace(), &req);
    run(state, req, directive, tenant, receipt, started).await
}

/// Run a validated request, count it, and see that its ledger row is written.
async fn run(
    state: Arc<AppState>,
    req: Validated,
    directive: super::cached::Directive,
    tenant: Arc<Tenant>,
    mut receipt: Receipt,
    started: Instant,
) -> Result<Response, ApiError> {
    let model = req.model.clone();
    receipt.set_request(&model, req.user.as_deref());
    // The job takes the receipt once it exists; until then a refusal writes the row here.
    let mut slot = Some(receipt);
    let r = run_job(
        state.clone(),
        req,
        directive,
        tenant.clone(),
        &mut slot,
        started,
    )
    .await;
    let status = r.as_ref().map_or_else(|e| e.status, |resp| resp.status());
    // Until the job took it, the receipt is here only for a refusal.
    if let (Some(mut receipt), Err(e)) = (slot, &r) {
        receipt.refuse(e);
    }
    count_request(&state, &tenant, &model, status);
    r
}

/// The model that runs the request first and the prompts in its tokens: a route group's pick
/// (rules, then the load check) with its plan, or the named model after its checks. The request
/// path and the render endpoints both resolve here, so render gives the ids the request runs.
pub(super) async fn resolve(
    state: &AppState,
    req: &Validated,
    tenant: &Tenant,
    trace: &Trace,
) -> Result<Resolved, ApiError> {
    let t0 = Instant::now();
    Ok(match state.routes.get().and_then(|r| r.get(&req.model)) {
        Some(group) => {
            let r = routed(state, req, tenant, group.clone()).await?;
            trace.span("route", None, t0, Instant::now(), || {
                let plan = r.2.as_ref();
                let mut v = vec![
                    KeyValue::new("hearth.route.group", req.model.clone()),
                    KeyValue::new("gen_ai.response.model", r.0.name.clone()),
                ];
                if let Some(p) = plan.and_then(|p| p.picked.clone()) {
                    v.push(KeyValue::new("hearth.route.picked", p));
                }
                if let Some(p) = plan.filter(|p| !p.next.is_empty()) {
                    v.push(KeyValue::new(
                        "hearth.route.escalation_models",
                        super::genai::strings(p.next.iter().map(|(e, _)| e.name.clone())),
                    ));
                }
                v
            });
            r
        }
        None => {
            let engine = engine(state, &req.model)?;
            checked(req, &engine)?;
            let prompts = tokenize(state, req, &engine).await?;
            trace.span("tokenize", None, t0, Instant::now(), || {
                let tokens: usize = prompts.iter().map(Vec::len).sum();
                vec![KeyValue::new("gen_ai.usage.input_tokens", tokens as i64)]
            });
            (engine, prompts, None)
        }
    })
}

/// The request on its model (or route group): model checks, tokens, grammar compiler.
async fn live(
    state: &AppState,
    req: &Validated,
    tenant: &Tenant,
    trace: &Trace,
) -> Result<generate::Source, ApiError> {
    let (engine, prompts, route) = resolve(state, req, tenant, trace).await?;
    if req.constraint.is_some() {
        // A model's first constrained request builds its grammar compiler (a trie over the whole
        // vocabulary): on the blocking pool, never on a reactor thread.
        let mut engines = vec![engine.clone()];
        if let Some(plan) = &route {
            engines.extend(plan.next.iter().map(|(e, _)| e.clone()));
        }
        tokio::task::spawn_blocking(move || {
            engines.iter().try_for_each(EngineHandle::warm_grammar)
        })
        .await
        .map_err(|e| ApiError::internal(format!("grammar task failed: {e}")))??;
    }
    Ok(generate::Source::Live {
        engine,
        prompts,
        route,
    })
}

/// Validated -> the response cache -> (on a miss) model checks, tokens -> the response (SSE map
/// or JSON fold).
async fn run_job(
    state: Arc<AppState>,
    req: Validated,
    directive: super::cached::Directive,
    tenant: Arc<Tenant>,
    receipt: &mut Option<Receipt>,
    started: Instant,
) -> Result<Response, ApiError> {
    use super::cached::Outcome;
    // An unknown model is refused before the cache or the tenant's limits spend anything on it.
    let is_route = state
        .routes
        .get()
        .is_some_and(|r| r.get(&req.model).is_some());
    if !is_route {
        engine(&state, &req.model)?;
    }
    // Admitted before the cache is asked: a refused request spends nothing (the semantic
    // lookup's embedding is device time), and a hit counts as a request like any other. Prompt
    // tokens are charged once known, below.
    let admission = state
        .limiter
        .admit(&tenant, 0)
        .map_err(ApiError::rate_limited)?;
    let trace = receipt
        .as_ref()
        .map(|r| r.trace().clone())
        .unwrap_or_default();
    let t0 = Instant::now();
    let outcome = super::cached::lookup(&state, &req, &tenant, directive).await?;
    let cache_header = outcome.header();
    if let Some(h) = &cache_header {
        trace.span("cache lookup", None, t0, Instant::now(), || {
            vec![KeyValue::new(
                "hearth.cache.result",
                h.to_str().unwrap_or_default().to_string(),
            )]
        });
    }
    let (source, cache, store) = match outcome {
        Outcome::Hit(hit, m) => (generate::Source::Cached(hit.answer), Some(m), None),
        Outcome::Miss(store) => {
            let m = store.metrics.clone();
            (
                live(&state, &req, &tenant, &trace).await?,
                Some(m),
                Some(*store),
            )
        }
        Outcome::Bypass(m) => (live(&state, &req, &tenant, &trace).await?, Some(m), None),
        Outcome::Off => (live(&state, &req, &tenant, &trace).await?, None, None),
    };
    // A replayed answer runs nothing: it counts as a request, not as tokens.
    if let generate::Source::Live { prompts, .. } = &source {
        let prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>() * req.n;
        admission.limiter().charge(prompt_tokens);
    }
    let stream = req.stream;
    let receipt = receipt
        .take()
        .ok_or_else(|| ApiError::internal("the request's ledger receipt was taken twice"))?;
    let job = Job {
        req,
        source,
        tenant,
        admission,
        receipt,
        started,
        cache,
        store,
    };
    let mut resp = if stream {
        let events = generate::stream(job, state.cut.subscribe())?
            .map(|data| Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)));
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        let body = generate::complete(job).await?;
        let device_ms = body.metrics().map_or(0.0, |m| m.device_time_ms);
        let route = body
            .metrics()
            .and_then(|m| m.route.as_ref().map(|d| d.summary()));
        let mut resp = Json(body).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("{device_ms:.3}")) {
            resp.headers_mut().insert("x-hearth-device-time-ms", v);
        }
        if let Some(v) = route.and_then(|r| axum::http::HeaderValue::from_str(&r).ok()) {
            resp.headers_mut().insert("x-hearth-route", v);
        }
        resp
    };
    if let Some(v) = cache_header {
        resp.headers_mut().insert(super::cached::HEADER, v);
    }
    Ok(resp)
}

/// Create a chat completion.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream` its chunks as Server-Sent Events", body = ChatCompletion, content_type = "application/json"),
        (status = 200, description = "With `stream`: `data: <chunk>` events, then `data: [DONE]`", body = ChatCompletionChunk, content_type = "text/event-stream"),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 500, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(state, caller, headers, body, validate::chat).await
}

/// Create a text completion.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion (JSON), or with `stream` its chunks as Server-Sent Events", body = Completion, content_type = "application/json"),
        (status = 200, description = "With `stream`: `data: <chunk>` events, then `data: [DONE]`", body = Completion, content_type = "text/event-stream"),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 500, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(state, caller, headers, body, validate::completion).await
}

/// The served models.
#[utoipa::path(get, path = "/v1/models",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let card = |id: &str, capabilities: &[&'static str]| ModelCard {
        id: id.to_string(),
        object: "model",
        created: state.created,
        owned_by: "hearth",
        capabilities: capabilities.to_vec(),
    };
    // The served models, then the route groups (a group is asked for like a model), then the
    // embedding models.
    let models = state.engines.get().into_iter().flatten().map(|(n, _)| n);
    let groups = state
        .routes
        .get()
        .into_iter()
        .flat_map(|r| r.groups())
        .map(|g| &g.name);
    let generate = ["chat.completions", "completions"];
    let embedders = state.embedders.get().into_iter().flatten();
    let data = models
        .chain(groups)
        .map(|n| card(n, &generate))
        .chain(embedders.map(|h| card(&h.name, &["embeddings"])))
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// Usage totals from the ledger: a tenant key sees its own tenant's, an admin key every tenant's.
/// Rows of requests finished before the query are committed first, so it sees all of them.
#[utoipa::path(get, path = "/v1/usage", params(UsageParams),
    responses((status = 200, body = UsageList), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn usage(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<UsageParams>,
) -> Result<Json<UsageList>, ApiError> {
    let ledger = state.ledger.clone().ok_or_else(|| {
        ApiError::unavailable(
            "no_ledger",
            "this server keeps no usage ledger (ledger_path and ledger_url are unset, or metering is off)",
        )
    })?;
    let tenant = match caller {
        Caller::Tenant { tenant, .. } => {
            if p.tenant.as_deref().is_some_and(|t| t != &*tenant.name) {
                return Err(ApiError::forbidden(
                    "a tenant key reads only its own tenant's usage",
                ));
            }
            Some(tenant.name.to_string())
        }
        Caller::Admin { .. } => p.tenant,
    };
    let q = UsageQuery {
        start: p.start,
        end: p.end,
        tenant,
        group_by: GroupBy::parse_list(p.group_by.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::invalid(e.to_string(), Some("group_by")))?,
    };
    ledger.flush().await;
    let data = tokio::task::spawn_blocking(move || ledger.query(&q))
        .await
        .map_err(|e| ApiError::internal(format!("usage query task failed: {e}")))??;
    Ok(Json(UsageList {
        object: "list",
        data,
    }))
}

/// Liveness: 200 while the process serves HTTP.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Object, description = "`{\"status\": \"ok\"}`")))]
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 once every model is loaded, 503 while loading or shutting down.
#[utoipa::path(get, path = "/ready", responses(
    (status = 200, body = Object, description = "`{\"status\": \"ready\"}`"),
    (status = 503, body = Object, description = "`{\"status\": \"loading\"}`")))]
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

/// The served decoders, embedding models, route groups (with their models) and configured
/// tenants, by name.
type ServedNames = (
    Vec<String>,
    Vec<String>,
    Vec<(String, Vec<String>)>,
    Vec<String>,
);

fn served(state: &AppState) -> ServedNames {
    let decoders = state
        .engines
        .get()
        .map(|e| e.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let embedders = state
        .embedders
        .get()
        .map(|e| e.iter().map(|h| h.name.clone()).collect())
        .unwrap_or_default();
    let routes = state
        .routes
        .get()
        .map(|r| {
            r.groups()
                .iter()
                .map(|g| (g.name.clone(), g.models.clone()))
                .collect()
        })
        .unwrap_or_default();
    let tenants = state
        .directory()
        .tenants()
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    (decoders, embedders, routes, tenants)
}

/// Prometheus text: engine gauges are read at scrape time from the same counters the engine keeps.
#[utoipa::path(get, path = "/metrics", responses((status = 200, body = String, content_type = "text/plain", description = "Prometheus exposition format")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut engine_secs = Vec::new();
    let mut tenant_secs = Vec::new();
    if let Some(engines) = state.engines.get() {
        for (name, e) in engines {
            let labels = [("model", name.clone())];
            let s = e.stats();
            metrics::gauge!(names::REQUESTS_RUNNING, &labels).set(s.running as f64);
            let waiting = e.waiting(&s) as f64;
            metrics::gauge!(names::REQUESTS_WAITING, &labels).set(waiting);
            metrics::gauge!(names::KV_BLOCKS_TOTAL, &labels).set(s.total_blocks as f64);
            metrics::gauge!(names::KV_BLOCKS_FREE, &labels).set(s.free_blocks as f64);
            metrics::gauge!(names::KV_BLOCKS_CACHED, &labels).set(s.cached_blocks as f64);
            let usage = s.kv_usage();
            metrics::gauge!(names::KV_CACHE_USAGE, &labels).set(usage);
            let vllm = [("model_name", name.clone())];
            metrics::gauge!(names::VLLM_WAITING, &vllm).set(waiting);
            metrics::gauge!(names::VLLM_RUNNING, &vllm).set(s.running as f64);
            metrics::gauge!(names::VLLM_KV_USAGE, &vllm).set(usage);
            metrics::gauge!(
                names::VLLM_CACHE_CONFIG,
                "model_name" => name.clone(),
                "block_size" => e.block_size().to_string(),
                "num_gpu_blocks" => s.total_blocks.to_string()
            )
            .set(1.0);
            metrics::counter!(names::PREFIX_QUERIES, &labels).absolute(s.prefix_query_tokens);
            metrics::counter!(names::PREFIX_HITS, &labels).absolute(s.prefix_hit_tokens);
            metrics::counter!(names::PREEMPTIONS, &labels).absolute(s.preemptions);
            metrics::counter!(names::ENGINE_STEPS, &labels).absolute(s.steps);
            engine_secs.push((name.clone(), s.device_nanos as f64 / 1e9));
            for (tenant, nanos) in &s.tenant_device_nanos {
                if !tenant.is_empty() {
                    tenant_secs.push((tenant.clone(), name.clone(), *nanos as f64 / 1e9));
                }
            }
        }
    }
    for h in state.embedders.get().into_iter().flatten() {
        let s = h.stats();
        let labels = [("model", h.name.clone())];
        metrics::gauge!(names::REQUESTS_WAITING, &labels).set(s.waiting as f64);
        metrics::counter!(names::EMBEDDING_BATCHES, &labels).absolute(s.batches);
        metrics::counter!(names::EMBEDDING_INPUTS, &labels).absolute(s.inputs);
        engine_secs.push((h.name.clone(), s.device_nanos as f64 / 1e9));
        for (tenant, nanos) in &s.tenant_device_nanos {
            tenant_secs.push((tenant.clone(), h.name.clone(), *nanos as f64 / 1e9));
        }
    }
    let served = served(&state);
    crate::telemetry::zero_series(&crate::telemetry::Served {
        decoders: &served.0,
        embedders: &served.1,
        routes: &served.2,
        tenants: &served.3,
    });
    crate::quality::drift().export(&served.0);
    // Every configured tenant on every model, at zero until it runs something.
    let seen: std::collections::HashSet<(String, String)> = tenant_secs
        .iter()
        .map(|(t, m, _)| (t.to_string(), m.clone()))
        .collect();
    for t in &served.3 {
        for m in served.0.iter().chain(&served.1) {
            if !seen.contains(&(t.clone(), m.clone())) {
                tenant_secs.push((t.as_str().into(), m.clone(), 0.0));
            }
        }
    }
    let cache = state.response_cache.stats();
    metrics::gauge!(names::RESPONSE_CACHE_ENTRIES).set(cache.entries as f64);
    metrics::gauge!(names::RESPONSE_CACHE_BYTES).set(cache.bytes as f64);
    let mut text = state.prometheus.render();
    text.push_str(&crate::telemetry::render_seconds_counter(
        names::RESPONSE_CACHE_SAVED_SECONDS,
        crate::telemetry::help(names::RESPONSE_CACHE_SAVED_SECONDS),
        &[(Vec::new(), cache.saved_device_nanos as f64 / 1e9)],
    ));
    text.push_str(&crate::telemetry::render_seconds_counter(
        names::ENGINE_DEVICE_SECONDS,
        crate::telemetry::help(names::ENGINE_DEVICE_SECONDS),
        &engine_secs
            .iter()
            .map(|(m, v)| (vec![("model", m.as_str())], *v))
            .collect::<Vec<_>>(),
    ));
    text.push_str(&crate::telemetry::render_seconds_counter(
        names::TENANT_DEVICE_SECONDS,
        crate::telemetry::help(names::TENANT_DEVICE_SECONDS),
        &tenant_secs
            .iter()
            .map(|(t, m, v)| (vec![("tenant", &**t), ("model", m.as_str())], *v))
            .collect::<Vec<_>>(),
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// This server's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, body = Object, description = "OpenAPI 3.1")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi_doc())
}

pub async fn not_found() -> ApiError {
    ApiError::http(StatusCode::NOT_FOUND, "no such endpoint")
}
