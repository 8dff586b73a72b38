//! The web console at `/`: a playground and a live view, served by the binary itself (the assets
//! are compiled in; the page loads nothing from anywhere else, so it works offline). The page holds
//! no data: it calls the API with the key its user types in, and the live view is a server-sent
//! event feed behind the same keys (a tenant key sees its own tenant's usage and errors, an admin
//! key everyone's).
pub mod errors;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::ledger::{GroupBy, UsageQuery, UsageRow};
use crate::tenancy::Caller;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Nothing but this server's own script, style and API: no CDN, no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// How often the live view is refreshed.
const TICK: Duration = Duration::from_secs(1);

/// Recent errors sent per snapshot.
const ERRORS_SHOWN: usize = 20;

/// Live feeds open at once, in all and per tenant (admins count as one): each holds a connection
/// for as long as its page is open.
const MAX_FEEDS: usize = 32;
const MAX_FEEDS_PER_SCOPE: usize = 4;

/// The live feeds' shared state: how many are open per scope, and each scope's usage of today,
/// read from the ledger at most once per tick whatever the number of viewers.
#[derive(Default)]
pub struct Feeds {
    open: Mutex<HashMap<String, usize>>,
    usage: Mutex<HashMap<String, Read>>,
}

/// A scope's usage of today and when it was read (None: no ledger, or the read failed).
type Read = (Instant, Option<Arc<Vec<UsageRow>>>);

/// A feed's place under the caps, given back when the feed ends.
struct Slot {
    state: Arc<AppState>,
    scope: String,
}

impl Feeds {
    fn open(state: &Arc<AppState>, scope: &str) -> Option<Slot> {
        let mut open = state
            .console
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.entry(scope.to_string()).or_default();
        if total >= MAX_FEEDS || *mine >= MAX_FEEDS_PER_SCOPE {
            return None;
        }
        *mine += 1;
        Some(Slot {
            state: state.clone(),
            scope: scope.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .state
            .console
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.scope) {
            *n = n.saturating_sub(1);
        }
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Served with the binary: a new build may change them.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// One served model's state, as the live view shows it.
#[derive(Debug, Serialize)]
struct ModelLive {
    name: String,
    running: usize,
    waiting: usize,
    /// Share of the KV blocks in use (0 to 1).
    kv_usage: f64,
    /// Tokens generated per second over the last tick.
    tokens_per_second: f64,
    /// Share of prompt tokens served from the prefix cache since start (None before any).
    prefix_hit_rate: Option<f64>,
}

/// What the live view gets every tick.
#[derive(Debug, Serialize)]
struct Snapshot<'a> {
    ts_ms: i64,
    /// `admin`, or the tenant the key belongs to.
    scope: String,
    /// None when this key may not see the engines (`metrics_require_key` and a tenant key).
    models: Option<Vec<ModelLive>>,
    /// Today's usage (UTC) by tenant, from the ledger; None without a ledger.
    usage_today: Option<&'a [UsageRow]>,
    errors: Vec<errors::ErrorEntry>,
}

/// The feed's state between ticks: each model's generated tokens at the previous one.
struct Feed {
    _slot: Slot,
    state: Arc<AppState>,
    tenant: Option<String>,
    scope: String,
    show_models: bool,
    last: HashMap<String, (u64, Instant)>,
    first: bool,
}

impl Feed {
    fn models(&mut self) -> Option<Vec<ModelLive>> {
        if !self.show_models {
            return None;
        }
        let engines = self.state.engines.get()?;
        let now = Instant::now();
        Some(
            engines
                .iter()
                .map(|(name, e)| {
                    let s = e.stats();
                    let rate = match self.last.get(name) {
                        Some(&(tokens, at)) => {
                            let secs = (now - at).as_secs_f64().max(1e-3);
                            s.decode_tokens.saturating_sub(tokens) as f64 / secs
                        }
                        None => 0.0,
                    };
                    self.last.insert(name.clone(), (s.decode_tokens, now));
                    ModelLive {
                        name: name.clone(),
                        running: s.running,
                        waiting: s.waiting,
                        kv_usage: s.kv_usage(),
                        tokens_per_second: rate,
                        prefix_hit_rate: (s.prefix_query_tokens > 0)
                            .then(|| s.prefix_hit_tokens as f64 / s.prefix_query_tokens as f64),
                    }
                })
                .collect(),
        )
    }

    /// Today's usage in this feed's scope: the copy another viewer read within the last tick, or
    /// a fresh read.
    async fn usage_today(&self) -> Option<Arc<Vec<UsageRow>>> {
        if let Some((at, rows)) = self.cached_usage() {
            if at.elapsed() < TICK {
                return rows;
            }
        }
        let rows = self.read_usage().await.map(Arc::new);
        self.state
            .console
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.scope.clone(), (Instant::now(), rows.clone()));
        rows
    }

    fn cached_usage(&self) -> Option<Read> {
        self.state
            .console
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.scope)
            .cloned()
    }

    async fn read_usage(&self) -> Option<Vec<UsageRow>> {
        let ledger = self.state.ledger.clone()?;
        let now = crate::ledger::now_ms() / 1000;
        let q = UsageQuery {
            start: Some(now - now.rem_euclid(86_400)),
            end: None,
            tenant: self.tenant.clone(),
            group_by: vec![GroupBy::Tenant],
        };
        // Rows of requests that just ended are committed first, as /v1/usage does.
        ledger.flush().await;
        match tokio::task::spawn_blocking(move || ledger.query(&q)).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "console: usage query failed");
                None
            }
            Err(_) => None,
        }
    }

    /// The next snapshot (the first at once, then one per tick); None once the server drains.
    async fn next(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.first) {
            tokio::time::sleep(TICK).await;
        }
        if self.state.shutting_down.load(Ordering::Relaxed) {
            return None;
        }
        let usage = self.usage_today().await;
        let snap = Snapshot {
            ts_ms: crate::ledger::now_ms(),
            scope: self.scope.clone(),
            models: self.models(),
            usage_today: usage.as_deref().map(Vec::as_slice),
            errors: self
                .state
                .errors
                .recent(self.tenant.as_deref(), ERRORS_SHOWN),
        };
        serde_json::to_string(&snap).ok()
    }
}

/// The live view's feed: a JSON snapshot per second as server-sent events, until the client leaves
/// or the server drains. Past the caps on open feeds, 429.
pub async fn live(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let (tenant, scope) = match &caller {
        Caller::Tenant { tenant, .. } => (
            Some(tenant.name.to_string()),
            format!("tenant {}", tenant.name),
        ),
        Caller::Admin { .. } => (None, "admin".to_string()),
    };
    let show_models = matches!(caller, Caller::Admin { .. }) || !state.metrics_require_key;
    let slot = Feeds::open(&state, &scope).ok_or_else(|| {
        ApiError::rate_limited(crate::tenancy::limits::Refusal {
            limit: "console_feeds",
            message: format!(
                "too many live views open (at most {MAX_FEEDS_PER_SCOPE} per tenant, \
                 {MAX_FEEDS} in all): close one"
            ),
            retry_after: Duration::from_secs(5),
        })
    })?;
    let feed = Feed {
        _slot: slot,
        state,
        tenant,
        scope,
        show_models,
        last: HashMap::new(),
        first: true,
    };
    Ok(Sse::new(stream::unfold(feed, |mut f| async move {
        let data = f.next().await?;
        Some((Ok(SseEvent::default().event("snapshot").data(data)), f))
    })))
}
