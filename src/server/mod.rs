//! The OpenAI-compatible HTTP server: axum routes over one engine per model.
pub mod auth;
pub mod billing;
pub mod cached;
pub mod cascade;
pub mod console;
pub mod embeddings;
pub mod error;
pub mod genai;
pub mod generate;
pub mod http;
pub mod openai;
pub mod render;
pub mod routes;
pub mod tools;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::config::Config;
use crate::engine::{Engine, EngineHandle};
use crate::error::{HearthError, Result};
use crate::model::Model;
use crate::tenancy::Directory;

pub struct AppState {
    /// Set once every model is loaded.
    pub engines: OnceLock<Vec<(String, EngineHandle)>>,
    /// The embedding models (set just before `engines`).
    pub embedders: OnceLock<Vec<crate::embedding::batcher::EmbedHandle>>,
    /// Route groups over the loaded models (set just before `engines`).
    pub routes: OnceLock<crate::router::Routes>,
    pub shutting_down: AtomicBool,
    pub prometheus: PrometheusHandle,
    pub created: u64,
    pub limits: validate::Limits,
    /// Requests that may tokenize at once (on the blocking pool).
    pub tokenize_permits: tokio::sync::Semaphore,
    pub http: Arc<http::HttpConfig>,
    /// Turns true at the drain deadline: streams still running end with an error event.
    pub cut: tokio::sync::watch::Sender<bool>,
    /// Tenants and keys; replaced whole on reload.
    pub directory: RwLock<Arc<Directory>>,
    pub metrics_require_key: bool,
    /// Per-tenant rate limits and concurrency.
    pub limiter: crate::tenancy::limits::Limiter,
    /// The usage ledger (None when `ledger_path` is unset).
    pub ledger: Option<Arc<crate::ledger::Ledger>>,
    /// Cached answers (held whatever the settings: a tenant or route may turn the cache on).
    pub response_cache: Arc<crate::cache::ResponseCache>,
    pub cache_config: crate::cache::CacheConfig,
    /// Response-cache settings of models and routes, by name.
    pub cache_by_name: Vec<(String, crate::cache::CacheSettings)>,
    /// The latest error endings, for the console.
    pub errors: Arc<console::errors::ErrorLog>,
    /// The console's live feeds.
    pub console: console::Feeds,
    /// The OTLP trace exporter (None when `otlp_endpoint` is unset).
    pub tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
}

impl AppState {
    /// The embedding model the semantic cache embeds with.
    pub fn cache_embedder(&self) -> Option<&crate::embedding::batcher::EmbedHandle> {
        let all = self.embedders.get()?;
        match &self.cache_config.embedding_model {
            Some(name) => all.iter().find(|h| &h.name == name),
            None => all.iter().find(|h| h.embedder().adapted()).or(all.first()),
        }
    }

    /// The current tenants and keys.
    pub fn directory(&self) -> Arc<Directory> {
        // A panic while swapping cannot leave a half-built directory (the swap is one store).
        self.directory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Take the tenants and keys of `config` (a rotated or revoked key counts from the next
    /// request) and its TLS certificate (for connections accepted from now on). An invalid config
    /// changes nothing.
    pub fn reload(&self, config: &Config) -> Result<()> {
        let directory = Arc::new(config.directory()?);
        let tls = config.tls()?;
        let tenants = directory.tenants().len();
        match (&self.http.tls, tls) {
            (Some(current), Some(renewed)) => {
                *current.write().unwrap_or_else(PoisonError::into_inner) = renewed;
                tracing::info!("TLS certificate reloaded");
            }
            (None, None) => {}
            _ => tracing::warn!("turning HTTPS on or off takes a restart; kept as it was"),
        }
        *self
            .directory
            .write()
            .unwrap_or_else(PoisonError::into_inner) = directory;
        tracing::info!(tenants, "tenants and keys reloaded");
        Ok(())
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Arc<Notify>,
    serve: tokio::task::JoinHandle<()>,
    loader: tokio::task::JoinHandle<Result<()>>,
}

/// The routes, under the HTTP middleware (outermost first): request id, span and log line, OpenAI
/// error bodies for the HTTP layer's own errors, Host and Content-Type checks, body timeout.
pub fn router(state: Arc<AppState>) -> Router {
    let http = state.http.clone();
    let x_request_id = axum::http::HeaderName::from_static("x-request-id");
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &axum::http::Request<_>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path())
        })
        .on_request(())
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO));
    Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions/render", post(render::chat))
        .route("/v1/completions/render", post(render::completion))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(routes::models))
        .route("/v1/usage", get(routes::usage))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .route("/", get(console::index))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route("/console/live", get(console::live))
        .fallback(routes::not_found)
        .with_state(state.clone())
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(http::drop_malformed_request_id))
                .layer(SetRequestIdLayer::new(x_request_id.clone(), http::RandomId))
                .layer(trace)
                .layer(PropagateRequestIdLayer::new(x_request_id))
                .layer(axum::middleware::from_fn(http::json_errors))
                .layer(axum::middleware::from_fn_with_state(
                    http.clone(),
                    http::guard,
                ))
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    auth::require_key,
                ))
                .layer(RequestBodyTimeoutLayer::new(http.body_read_timeout)),
        )
}

/// The bearer-key scheme the `/v1` routes declare.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    modifiers(&BearerAuth),
    info(
        title = "Hearth",
        description = "OpenAI-compatible LLM inference server"
    ),
    paths(
        routes::chat,
        routes::completions,
        render::chat,
        render::completion,
        embeddings::embeddings,
        routes::models,
        routes::usage,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::openapi
    )
)]
struct ApiDoc;

/// The OpenAPI document of every route, from the request and response types.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}

fn load_all(
    config: &Config,
    device: &Device,
    kv_events: Option<crate::kv_events::Sink>,
) -> Result<Vec<(String, EngineHandle)>> {
    let total = config.models.len();
    let mut engines = Vec::with_capacity(total);
    for (i, m) in config.models.iter().enumerate() {
        let t0 = Instant::now();
        tracing::info!(model = %m.name, path = %m.path.display(), "loading model {}/{total}", i + 1);
        let mut model = Model::load(&m.path, &m.name, device)?;
        if let Some(t) = &m.chat_template {
            let source = std::fs::read_to_string(t).map_err(|e| {
                HearthError::Config(format!(
                    "model `{}`: cannot read chat_template {}: {e}",
                    m.name,
                    t.display()
                ))
            })?;
            model.chat_template.replace_source(source);
            // A template that cannot render a plain turn would fail every chat request.
            model
                .chat_template
                .render(&[crate::model::ChatMessage::new("user", "hi")])
                .map_err(|e| {
                    HearthError::Config(format!(
                        "model `{}`: chat_template {}: {e}",
                        m.name,
                        t.display()
                    ))
                })?;
        }
        let engine = Engine::start(
            model,
            crate::engine::EngineConfig {
                kv_events: kv_events.clone(),
                ..config.engine()
            },
        )?;
        tracing::info!(model = %m.name, secs = t0.elapsed().as_secs_f32(), "model {}/{total} ready", i + 1);
        engines.push((m.name.clone(), engine));
    }
    Ok(engines)
}

/// The response cache, restored from the ledger's file when `[cache] persist` is on.
fn response_cache(config: &Config) -> crate::cache::ResponseCache {
    let max = config.cache.max_mib << 20;
    let path = config
        .ledger_path
        .as_deref()
        .filter(|_| config.cache.persist);
    match path.map(|p| crate::cache::ResponseCache::persisted(max, p)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::error!(error = %e, "the persisted response cache cannot be read; starting empty, in memory only");
            crate::cache::ResponseCache::new(max)
        }
        None => crate::cache::ResponseCache::new(max),
    }
}

fn load_embedders(
    config: &Config,
    device: &Device,
) -> Result<Vec<crate::embedding::batcher::EmbedHandle>> {
    // On the CPU an embedding forward takes its turn between decoder steps (crate::device::
    // cpu_turn): kept to a decoder step's size, it does not stall running streams for longer
    // than a step.
    let max_batch_tokens = if device.is_cpu() {
        config.embedding_batch_tokens.min(config.max_batch_tokens)
    } else {
        config.embedding_batch_tokens
    };
    let batching = crate::embedding::batcher::BatchConfig {
        max_batch_tokens,
        max_waiting: config.max_waiting,
    };
    config
        .embedding_models
        .iter()
        .map(|m| {
            let t0 = Instant::now();
            let adapter = m.adapter.as_deref().map(crate::embedding::adapter::Adapter::parse);
            let e = crate::embedding::Embedder::load_adapted(&m.path, adapter.as_ref(), device)?;
            tracing::info!(model = %m.name, dims = e.dims(), encoder = e.encoder(), secs = t0.elapsed().as_secs_f32(), "embedding model ready");
            crate::embedding::batcher::EmbedHandle::start(&m.name, e, batching)
        })
        .collect()
}

impl Server {
    /// Bind, start serving (/health answers at once), and load the models in the background;
    /// /ready turns 200 when they are loaded.
    pub async fn start(config: Config, device: Device) -> Result<Self> {
        let directory = config.directory()?;
        config.check_routes()?;
        if directory.is_open() {
            tracing::warn!(
                "no API keys configured: serving open, every request as tenant `{}` (local development only)",
                crate::tenancy::OPEN_TENANT
            );
        }
        let tls = config.tls()?.map(RwLock::new);
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}:{}: {e}", config.host, config.port),
                )
            })?;
        let state = Arc::new(AppState {
            engines: OnceLock::new(),
            embedders: OnceLock::new(),
            routes: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            prometheus: crate::telemetry::prometheus(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            limits: config.limits(),
            tokenize_permits: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
            ),
            http: Arc::new(http::HttpConfig {
                header_read_timeout: Duration::from_secs(config.header_read_timeout_secs.max(1)),
                body_read_timeout: Duration::from_secs(config.body_read_timeout_secs.max(1)),
                max_connections: config
                    .max_connections
                    .unwrap_or_else(|| http::default_max_connections(http::raise_fd_limit())),
                max_body_bytes: config.max_body_bytes,
                drain_bytes: config.max_body_bytes.max(1 << 20),
                allowed_hosts: config.allowed_hosts.clone(),
                bound: listener.local_addr()?.ip(),
                tls,
            }),
            cut: tokio::sync::watch::channel(false).0,
            directory: RwLock::new(Arc::new(directory)),
            metrics_require_key: config.metrics_require_key,
            limiter: Default::default(),
            ledger: config
                .ledger()?
                .map(|t| Arc::new(crate::ledger::Ledger::open(t, config.ledger_retention_days))),
            response_cache: Arc::new(response_cache(&config)),
            cache_config: config.cache.clone(),
            cache_by_name: config.cache_by_name(),
            errors: Default::default(),
            console: Default::default(),
            tracing: config
                .traces()?
                .map(|t| crate::telemetry::trace::Tracing::start(&t))
                .transpose()?,
        });
        let addr = listener.local_addr()?;
        tracing::info!(
            %addr,
            max_connections = state.http.max_connections,
            https = state.http.tls.is_some(),
            "listening"
        );
        let stop = Arc::new(Notify::new());
        let app = router(state.clone());
        let stop_signal = stop.clone();
        let http_cfg = state.http.clone();
        let serve = tokio::spawn(http::serve(listener, app, http_cfg, async move {
            stop_signal.notified().await
        }));
        let kv_events = match config.kv_events() {
            Some(k) => Some(crate::kv_events::start(&k).await?),
            None => None,
        };
        let loader_state = state.clone();
        let loader = tokio::task::spawn_blocking(move || {
            let engines = load_all(&config, &device, kv_events)?;
            let embedders = load_embedders(&config, &device)?;
            let costs: Vec<(String, u128)> = engines
                .iter()
                .map(|(name, e)| (name.clone(), e.cost_per_token))
                .collect();
            let routes = crate::router::Routes::new(&config.routes, &costs)?;
            for g in routes.groups() {
                tracing::info!(route = %g.name, models = ?g.models, policy = ?g.policy, "route group");
            }
            let _ = loader_state.routes.set(routes);
            let _ = loader_state.embedders.set(embedders);
            let _ = loader_state.engines.set(engines);
            tracing::info!("ready");
            Ok(())
        });
        Ok(Self {
            addr,
            state,
            stop,
            serve,
            loader,
        })
    }

    /// Wait until the models are loaded (or loading failed).
    pub async fn wait_ready(&mut self) -> Result<()> {
        (&mut self.loader)
            .await
            .map_err(|e| HearthError::InvalidRequest(format!("model loader panicked: {e}")))?
    }

    /// Stop accepting, let in-flight requests finish for up to `drain` (idle connections close at
    /// once), then cut the streams still running (each ends with an error event and `[DONE]`) and
    /// return.
    pub async fn shutdown(self, drain: Duration) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        self.stop.notify_one();
        let mut serve = self.serve;
        if tokio::time::timeout(drain, &mut serve).await.is_err() {
            tracing::warn!(?drain, "drain deadline: cutting the requests still running");
            let _ = self.state.cut.send(true);
            if tokio::time::timeout(Duration::from_secs(2), serve)
                .await
                .is_err()
            {
                tracing::warn!("exiting with connections still open");
            }
        }
        // Every request has ended (or been cut): commit their ledger rows and the cache's copy
        // before exiting.
        if let Some(ledger) = self.state.ledger.clone() {
            let _ = tokio::task::spawn_blocking(move || ledger.close()).await;
        }
        let cache = self.state.response_cache.clone();
        let _ = tokio::task::spawn_blocking(move || cache.close()).await;
        if let Some(t) = self.state.tracing.clone() {
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
    }
}

async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// On each SIGHUP, re-read the config file's tenants and keys. The signal is registered by the
/// caller, before the models load, so an early SIGHUP cannot take the default action (exit).
#[cfg(unix)]
async fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    state: Arc<AppState>,
    path: Option<PathBuf>,
) {
    while hup.recv().await.is_some() {
        let Some(path) = path.as_deref() else {
            tracing::warn!("SIGHUP: no --config file to reload");
            continue;
        };
        if let Err(e) = Config::load(Some(path)).and_then(|c| state.reload(&c)) {
            tracing::error!(error = %e, "SIGHUP: config not reloaded; keeping the current keys");
        }
    }
}

/// `hearth serve`: run until SIGTERM / SIGINT, then drain and return. SIGHUP reloads the tenants
/// and keys from `config_path`.
pub async fn run(config: Config, config_path: Option<PathBuf>, device: Device) -> Result<()> {
    let drain = Duration::from_secs(config.drain_timeout_secs);
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut server = Server::start(config, device).await?;
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(hup, server.state.clone(), config_path));
    #[cfg(not(unix))]
    let _ = config_path;
    tokio::select! {
        r = server.wait_ready() => r?,
        _ = termination() => {
            tracing::info!("signal received while loading; exiting");
            return Ok(());
        }
    }
    termination().await;
    tracing::info!("signal received: draining");
    server.shutdown(drain).await;
    tracing::info!("stopped");
    Ok(())
}
