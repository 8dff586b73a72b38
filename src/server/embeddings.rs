//! `POST /v1/embeddings`: parse and validate (before any tokenization), tokenize on the blocking
//! pool, admit under the tenant's limits, queue on the model's batcher, answer in OpenAI's shape
//! (`float` or `base64`), and write the request's ledger row.
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::Value;

use super::billing::{Ending, Receipt};
use super::error::ApiError;
use super::openai::{
    Embedding, EmbeddingInput, EmbeddingMetrics, EmbeddingRequest, EmbeddingResponse,
    EmbeddingUsage, EmbeddingVector, ErrorResponse,
};
use super::routes::{count_request, counted, parse, receipt, tenant_of};
use super::AppState;
use crate::embedding::batcher::EmbedHandle;
use crate::telemetry::names;
use crate::tenancy::{Caller, Tenant};

/// OpenAI's limit on inputs per request.
pub const MAX_INPUTS: usize = 2048;

/// A request that passed the checks that need no model.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub model: String,
    pub input: EmbeddingInput,
    pub base64: bool,
    pub dimensions: Option<u64>,
    pub user: Option<String>,
    pub truncate: bool,
}

fn bad_input(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message, Some("input"))
}

const INPUT_SHAPES: &str = "`input` must be a string, an array of strings, an array of token ids, \
     or an array of arrays of token ids";

/// A token id from JSON: a whole number that fits in 32 bits.
fn token_id(v: &Value) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad_input(format!("token ids must be whole numbers >= 0; got {v}")))
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(bad_input("an array of token ids must not be empty"));
    }
    items.iter().map(token_id).collect()
}

fn text(v: &str) -> Result<String, ApiError> {
    if v.is_empty() {
        return Err(bad_input("an input string must not be empty"));
    }
    Ok(v.to_string())
}

/// `input` in one of its four shapes, none of them empty, at most `MAX_INPUTS` inputs.
fn input(v: &Value) -> Result<EmbeddingInput, ApiError> {
    let items = match v {
        Value::String(s) => return Ok(EmbeddingInput::Text(text(s)?)),
        Value::Array(items) => items,
        _ => return Err(bad_input(INPUT_SHAPES)),
    };
    if items.is_empty() {
        return Err(bad_input("`input` must not be an empty array"));
    }
    if items.len() > MAX_INPUTS {
        return Err(bad_input(format!(
            "`input` has {} items; at most {MAX_INPUTS} are accepted per request",
            items.len()
        )));
    }
    match &items[0] {
        Value::String(_) => items
            .iter()
            .map(|x| match x {
                Value::String(s) => text(s),
                _ => Err(bad_input(format!(
                    "{INPUT_SHAPES}; an array of strings holds only strings"
                ))),
            })
            .collect::<Result<_, _>>()
            .map(EmbeddingInput::Texts),
        Value::Number(_) => token_ids(items).map(EmbeddingInput::Tokens),
        Value::Array(_) => items
            .iter()
            .map(|x| match x {
                Value::Array(ids) => token_ids(ids),
                _ => Err(bad_input(format!(
                    "{INPUT_SHAPES}; an array of token-id arrays holds only arrays"
                ))),
            })
            .collect::<Result<_, _>>()
            .map(EmbeddingInput::TokenLists),
        _ => Err(bad_input(INPUT_SHAPES)),
    }
}

/// The checks that need no model: shapes, counts, formats.
pub fn validate(req: EmbeddingRequest) -> Result<Validated, ApiError> {
    if req.model.is_empty() {
        return Err(ApiError::invalid(
            "`model` must not be empty",
            Some("model"),
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
                Some("encoding_format"),
            ))
        }
    };
    Ok(Validated {
        model: req.model,
        input: input(&req.input)?,
        base64,
        dimensions: req.dimensions,
        user: super::validate::user_label(req.user)?,
        truncate: req.truncate.unwrap_or(false),
    })
}

/// The served embedding model named `model`, or why there is none.
fn embedder(state: &AppState, model: &str) -> Result<EmbedHandle, ApiError> {
    if state
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(ApiError::shutting_down());
    }
    let loaded = state
        .embedders
        .get()
        .ok_or_else(|| ApiError::unavailable("not_ready", "models are still loading"))?;
    if let Some(h) = loaded.iter().find(|h| h.name == model) {
        return Ok(h.clone());
    }
    let generates = state
        .engines
        .get()
        .is_some_and(|e| e.iter().any(|(n, _)| n == model))
        || state.routes.get().is_some_and(|r| r.get(model).is_some());
    if generates {
        let names: Vec<&str> = loaded.iter().map(|h| h.name.as_str()).collect();
        return Err(ApiError::invalid(
            format!(
                "`{model}` is a text-generation model; /v1/embeddings takes an embedding model ({})",
                if names.is_empty() {
                    "none is served".to_string()
                } else {
                    names.join(", ")
                }
            ),
            Some("model"),
        ));
    }
    Err(ApiError::model_not_found(model))
}

/// Each input's token ids, checked against the model: at most `max_tokens` each (longer ones cut
/// when `truncate`), ids within the vocabulary.
fn tokenize(h: &EmbedHandle, req: &Validated) -> Result<Vec<Vec<u32>>, ApiError> {
    let e = h.embedder();
    let max = e.max_tokens();
    let too_long = |i: usize, n: usize| {
        bad_input(format!(
            "input {i} has {n} tokens; `{}` embeds at most {max} (send `truncate: true` to cut \
             longer inputs as sentence-transformers does)",
            h.name
        ))
    };
    let texts = |texts: &[String]| -> Result<Vec<Vec<u32>>, ApiError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ids = e.tokenize_whole(t)?;
                match (ids.len() > max, req.truncate) {
                    (false, _) => Ok(ids),
                    (true, true) => Ok(e.tokenize(t)?),
                    (true, false) => Err(too_long(i, ids.len())),
                }
            })
            .collect()
    };
    let lists = |lists: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, ApiError> {
        lists
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                if let Some(id) = ids.iter().find(|&&id| id as usize >= e.vocab()) {
                    return Err(bad_input(format!(
                        "token id {id} is out of range for `{}`'s {} tokens",
                        h.name,
                        e.vocab()
                    )));
                }
                match (ids.len() > max, req.truncate) {
                    (false, _) => Ok(ids.clone()),
                    (true, true) => Ok(e.cut(ids)),
                    (true, false) => Err(too_long(i, ids.len())),
                }
            })
            .collect()
    };
    match &req.input {
        EmbeddingInput::Text(t) => texts(std::slice::from_ref(t)),
        EmbeddingInput::Texts(v) => texts(v),
        EmbeddingInput::Tokens(ids) => lists(std::slice::from_ref(ids)),
        EmbeddingInput::TokenLists(v) => lists(v),
    }
}

/// The little-endian bytes of the floats, base64 (what the openai clients decode).
fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Create embeddings.
#[utoipa::path(post, path = "/v1/embeddings", request_body = EmbeddingRequest,
    responses(
        (status = 200, body = EmbeddingResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 500, body = ErrorResponse),
        (status = 503, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (tenant, key_id) = tenant_of(caller)?;
    let mut receipt = receipt(&state, &headers, &tenant, &key_id, started);
    let req = async { validate(parse::<EmbeddingRequest>(&state, &headers, body).await?) }.await;
    receipt
        .trace()
        .span("validate", None, started, Instant::now(), Vec::new);
    let req = counted(&state, &tenant, &mut receipt, req)?;
    receipt.set_request(&req.model, req.user.as_deref());
    super::genai::embedding(receipt.trace(), &req.model);
    let model = req.model.clone();
    let r = embed(&state, req, &tenant, &mut receipt, started).await;
    let status = r.as_ref().map_or_else(|e| e.status, |resp| resp.status());
    if let Err(e) = &r {
        receipt.refuse(e);
    }
    count_request(&state, &tenant, &model, status);
    r
}

async fn embed(
    state: &AppState,
    req: Validated,
    tenant: &Tenant,
    receipt: &mut Receipt,
    started: Instant,
) -> Result<Response, ApiError> {
    let h = embedder(state, &req.model)?;
    let dims = h.embedder().dims();
    if let Some(d) = req.dimensions.filter(|&d| d != dims as u64) {
        return Err(ApiError::unsupported(
            "dimensions",
            format!(
                "`{}` makes {dims}-dimensional vectors and cannot shorten them; `dimensions` \
                 may only be {dims} (got {d})",
                h.name
            ),
        ));
    }
    let ids = {
        let _permit = state
            .tokenize_permits
            .acquire()
            .await
            .map_err(|_| ApiError::shutting_down())?;
        let (h, req) = (h.clone(), req.clone());
        tokio::task::spawn_blocking(move || tokenize(&h, &req))
            .await
            .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??
    };
    metrics::counter!(names::TOKENIZED_REQUESTS, "model" => h.name.clone()).increment(1);
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if tokens > state.limits.max_request_tokens {
        return Err(bad_input(format!(
            "the inputs have {tokens} tokens in all; at most {} per request \
             (`max_request_tokens`)",
            state.limits.max_request_tokens
        )));
    }
    let admission = state
        .limiter
        .admit(tenant, tokens)
        .map_err(ApiError::rate_limited)?;
    let submitted = Instant::now();
    let rx = h.submit(ids, tenant.name.clone())?;
    let done = rx
        .await
        .map_err(|_| ApiError::from(crate::HearthError::EngineStopped))??;
    drop(admission);
    let trace = receipt.trace();
    trace.span("queue", None, submitted, submitted + done.queue, Vec::new);
    trace.span(
        "embed",
        None,
        submitted + done.queue,
        Instant::now(),
        || {
            vec![
                opentelemetry::KeyValue::new("gen_ai.usage.input_tokens", tokens as i64),
                opentelemetry::KeyValue::new(
                    "hearth.device_time_ms",
                    done.device.as_secs_f64() * 1e3,
                ),
            ]
        },
    );
    let device_ms = done.device.as_secs_f64() * 1e3;
    let queue_ms = done.queue.as_secs_f64() * 1e3;
    let data = done
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding",
            index,
            embedding: if req.base64 {
                EmbeddingVector::Base64(base64_f32(&v))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    receipt.finish(Ending::Embedded {
        tokens,
        device_ms,
        queue_ms,
    });
    let labels = [("model", h.name.clone())];
    metrics::histogram!(names::E2E_LATENCY, &labels).record(started.elapsed().as_secs_f64());
    metrics::histogram!(names::QUEUE_TIME, &labels).record(done.queue.as_secs_f64());
    metrics::counter!(names::PROMPT_TOKENS, &labels).increment(tokens as u64);
    metrics::counter!(names::REQUESTS_FINISHED, &labels).increment(1);
    metrics::counter!(
        names::TENANT_TOKENS,
        "tenant" => tenant.name.to_string(),
        "model" => h.name.clone(),
        "kind" => "prompt"
    )
    .increment(tokens as u64);
    let mut resp = Json(EmbeddingResponse {
        object: "list",
        data,
        model: h.name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
        metrics: EmbeddingMetrics {
            queue_time_ms: queue_ms,
            device_time_ms: device_ms,
        },
    })
    .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("{device_ms:.3}")) {
        resp.headers_mut().insert("x-hearth-device-time-ms", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(input: Value) -> EmbeddingRequest {
        EmbeddingRequest {
            model: "m".into(),
            input,
            encoding_format: None,
            dimensions: None,
            user: None,
            truncate: None,
        }
    }

    #[test]
    fn the_four_input_shapes_parse_and_everything_else_is_refused() {
        let ok = |v: Value| validate(req(v)).map(|r| r.input);
        assert_eq!(ok(json!("hi")).unwrap(), EmbeddingInput::Text("hi".into()));
        assert_eq!(
            ok(json!(["a", "b"])).unwrap(),
            EmbeddingInput::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            ok(json!([101, 7592, 102])).unwrap(),
            EmbeddingInput::Tokens(vec![101, 7592, 102])
        );
        assert_eq!(
            ok(json!([[101, 102], [101, 5, 102]])).unwrap(),
            EmbeddingInput::TokenLists(vec![vec![101, 102], vec![101, 5, 102]])
        );
        let many: Vec<&str> = vec!["x"; MAX_INPUTS + 1];
        for (bad, says) in [
            (json!(""), "empty"),
            (json!([]), "empty array"),
            (json!(["a", ""]), "empty"),
            (json!([[]]), "must not be empty"),
            (json!(["a", 1]), "only strings"),
            (json!([[1], 2]), "only arrays"),
            (json!([1, -2]), "whole numbers"),
            (json!([1.5]), "whole numbers"),
            (json!([4294967296u64]), "whole numbers"),
            (json!(null), "must be a string"),
            (json!({"text": "a"}), "must be a string"),
            (json!([null]), "must be a string"),
            (json!(many), "at most 2048"),
        ] {
            let e = ok(bad.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert_eq!(e.param, Some("input"));
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn encoding_format_is_float_or_base64() {
        let with = |f: &str| {
            validate(EmbeddingRequest {
                encoding_format: Some(f.into()),
                ..req(json!("a"))
            })
        };
        assert!(!with("float").unwrap().base64);
        assert!(with("base64").unwrap().base64);
        assert_eq!(
            with("int8").unwrap_err().param,
            Some("encoding_format"),
            "unknown formats are refused"
        );
    }

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 00 00 80 3f; -2.0f32 = 00 00 00 c0.
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
    }
}
