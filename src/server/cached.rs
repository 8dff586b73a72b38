//! The response cache on the request path: after validation and before any tokenization for the
//! model, a request is looked up (the exact level, then the semantic one, whose embedding runs on
//! the embedding model's batcher and is billed to the request); a hit is replayed through the
//! same event stream a model's answer takes, and a miss carries a `Store` that keeps the answer
//! when it finishes.
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};

use super::error::ApiError;
use super::openai::CacheMetrics;
use super::validate::Validated;
use super::AppState;
use crate::cache::inflight::{self, Turn};
use crate::cache::{key, Answer, Hit, Policy, Query, ResponseCache};
use crate::telemetry::names;
use crate::tenancy::Tenant;

pub const HEADER: &str = "x-hearth-cache";

/// The longest a request waits for the same request's answer before generating its own.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the client asked of the cache in `x-hearth-cache`: `bypass`, or
/// `min-similarity=<0..1>` (a threshold above the configured one; a lower one changes nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Directive {
    pub bypass: bool,
    pub min_similarity: Option<f32>,
}

pub fn directive(headers: &HeaderMap) -> Result<Directive, ApiError> {
    let mut d = Directive::default();
    let Some(v) = headers.get(HEADER) else {
        return Ok(d);
    };
    let bad = || {
        ApiError::invalid(
            format!("`{HEADER}` takes `bypass` or `min-similarity=<a number from 0 to 1>`"),
            None,
        )
    };
    for part in v.to_str().map_err(|_| bad())?.split(',') {
        let part = part.trim();
        if part.eq_ignore_ascii_case("bypass") {
            d.bypass = true;
        } else if let Some(x) = part.strip_prefix("min-similarity=") {
            let x: f32 = x.trim().parse().map_err(|_| bad())?;
            if !(0.0..=1.0).contains(&x) {
                return Err(bad());
            }
            d.min_similarity = Some(x);
        } else if !part.is_empty() {
            return Err(bad());
        }
    }
    Ok(d)
}

/// The cache's part in one request.
pub enum Outcome {
    /// No cache level is on for this request.
    Off,
    Bypass(CacheMetrics),
    Hit(Hit, CacheMetrics),
    Miss(Box<Store>),
}

impl Outcome {
    /// The `x-hearth-cache` value, when the cache is on.
    pub fn header(&self) -> Option<HeaderValue> {
        let v = match self {
            Self::Off => return None,
            Self::Bypass(_) => "bypass",
            Self::Hit(..) => "hit",
            Self::Miss(_) => "miss",
        };
        Some(HeaderValue::from_static(v))
    }
}

/// A missed request's place in the cache, kept until its answer finishes.
pub struct Store {
    cache: Arc<ResponseCache>,
    tenant: Arc<str>,
    /// The model or route asked for.
    scope: Arc<str>,
    keys: key::Keys,
    query: Option<Query>,
    policy: Policy,
    pub metrics: CacheMetrics,
    /// Held until the answer is kept or the request ends: the same request waits meanwhile.
    leader: Option<inflight::Leader>,
}

impl Store {
    /// Keep the finished answer.
    pub fn put(self, answer: Answer) {
        let kept = self.cache.put(
            &self.tenant,
            &self.scope,
            &self.keys,
            self.query,
            answer,
            &self.policy,
        );
        if let (true, Some(l)) = (kept, &self.leader) {
            l.kept();
        }
    }
}

fn count(result: &'static str, kind: &str) {
    metrics::counter!(names::RESPONSE_CACHE, "result" => result, "kind" => kind.to_string())
        .increment(1);
}

fn bypass(reason: &'static str) -> Outcome {
    count("bypass", reason);
    Outcome::Bypass(CacheMetrics {
        status: "bypass",
        bypass_reason: Some(reason),
        ..Default::default()
    })
}

/// Look `req` up in its tenant's partition, as the settings for its tenant and model allow.
pub async fn lookup(
    state: &AppState,
    req: &Validated,
    tenant: &Tenant,
    d: Directive,
) -> Result<Outcome, ApiError> {
    let cache = state.response_cache.clone();
    let named = state
        .cache_by_name
        .iter()
        .find(|(n, _)| *n == req.model)
        .map(|(_, c)| c);
    let policy = state.cache_config.policy(named, tenant.cache.as_ref());
    if !policy.on() {
        return Ok(Outcome::Off);
    }
    if d.bypass {
        return Ok(bypass("client"));
    }
    if let Some(why) = key::not_cacheable(req) {
        return Ok(bypass(why));
    }
    let r = req.clone();
    let mut keys = tokio::task::spawn_blocking(move || key::keys(&r))
        .await
        .map_err(|e| ApiError::internal(format!("cache key task failed: {e}")))?;
    let embedder = state.cache_embedder();
    // Unset, the threshold is the one measured for the embedding model (its adapter).
    let configured = policy.threshold.unwrap_or_else(|| {
        embedder.map_or(crate::cache::DEFAULT_THRESHOLD, |h| {
            crate::cache::default_threshold(h.embedder())
        })
    });
    let threshold = configured.max(d.min_similarity.unwrap_or(0.0));
    let mut metrics = CacheMetrics {
        status: "miss",
        ..Default::default()
    };
    // The same request already being generated: wait for its answer rather than generate it
    // again. Not for long: a streamed answer is kept only once its client has read it all, and
    // a stalled client must not hold up the rest.
    let mut leader = None;
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        if let Some(hit) = cache.get(&tenant.name, &keys, None, &policy, threshold) {
            return Ok(hit_outcome(hit, metrics));
        }
        if !policy.exact {
            break;
        }
        match cache.inflight.turn(&tenant.name, keys.exact) {
            Turn::Lead(l) => {
                leader = Some(l);
                break;
            }
            // Kept: look it up. Not kept (the leader failed, its client left, the answer was
            // too large) or too long a wait: generate it without leading.
            Turn::Wait(rx) => match tokio::time::timeout_at(deadline, inflight::wait(rx)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            },
        }
    }
    let mut query = None;
    if let (true, Some(text), Some(embedder)) = (policy.semantic, &keys.text, embedder) {
        // Vectors of one embedding model are comparable with that model's only: its identity
        // is part of the semantic key.
        let e = embedder.embedder();
        keys.semantic = key::with_embedder(
            &keys.semantic,
            &embedder.name,
            e.dims(),
            e.vocab(),
            e.adapter_digest(),
        );
        // The semantic level is an optimization: when it cannot run (the embedding model's queue
        // is full, it stopped), the request goes on with the exact level alone.
        match embed(embedder, text, &tenant.name).await {
            Ok(Some((q, device))) => {
                metrics.lookup_device_time_ms = device * 1e3;
                if let Some(hit) = cache.get(&tenant.name, &keys, Some(&q), &policy, threshold) {
                    return Ok(hit_outcome(hit, metrics));
                }
                query = Some(q);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e.message, "semantic cache lookup skipped");
                count("error", "semantic");
            }
        }
    }
    let levels = match (policy.exact, query.is_some()) {
        (true, true) => "exact,semantic",
        (true, false) => "exact",
        (false, true) => "semantic",
        (false, false) => "none",
    };
    count("miss", levels);
    Ok(Outcome::Miss(Box::new(Store {
        cache,
        tenant: tenant.name.clone(),
        scope: req.model.as_str().into(),
        keys,
        query,
        policy,
        metrics,
        leader,
    })))
}

/// `text`'s embedding on the cache's embedding model (billed to `tenant`) and the device seconds
/// it took; None when the text is longer than the model reads (compared by its start only, it
/// could match a text that differs after it: such requests use the exact level alone).
async fn embed(
    embedder: &crate::embedding::batcher::EmbedHandle,
    text: &str,
    tenant: &Arc<str>,
) -> Result<Option<(Query, f64)>, ApiError> {
    let e = embedder.clone();
    let t = text.to_string();
    let ids = tokio::task::spawn_blocking(move || e.embedder().tokenize_whole(&t))
        .await
        .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??;
    if ids.len() > embedder.embedder().max_tokens() {
        return Ok(None);
    }
    let done = embedder
        .submit(vec![ids], tenant.clone())?
        .await
        .map_err(|_| ApiError::from(crate::HearthError::EngineStopped))??;
    let Some(vector) = done.vectors.into_iter().next() else {
        return Err(ApiError::internal("the embedding model returned no vector"));
    };
    let q = Query {
        text: text.to_string(),
        vector,
    };
    Ok(Some((q, done.device.as_secs_f64())))
}

fn hit_outcome(hit: Hit, mut metrics: CacheMetrics) -> Outcome {
    count("hit", hit.kind.as_str());
    metrics::histogram!(names::RESPONSE_CACHE_SIMILARITY, "kind" => hit.kind.as_str())
        .record(f64::from(hit.similarity));
    metrics.status = "hit";
    metrics.hit = true;
    metrics.kind = Some(hit.kind.as_str());
    metrics.similarity = Some(hit.similarity);
    metrics.saved_device_time_ms = hit.answer.device_ms;
    Outcome::Hit(hit, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_takes_bypass_and_a_threshold_and_nothing_else() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(HEADER, HeaderValue::from_str(v).unwrap());
            directive(&h)
        };
        assert_eq!(directive(&HeaderMap::new()).unwrap(), Directive::default());
        assert!(with("bypass").unwrap().bypass);
        assert_eq!(
            with("min-similarity=0.97").unwrap().min_similarity,
            Some(0.97)
        );
        let both = with("bypass, min-similarity=1").unwrap();
        assert!(both.bypass && both.min_similarity == Some(1.0));
        for bad in [
            "skip",
            "min-similarity=1.5",
            "min-similarity=x",
            "min-similarity=-0.1",
        ] {
            assert_eq!(with(bad).unwrap_err().status, 400, "{bad}");
        }
    }
}
