//! The OpenAI-compatible HTTP server: axum routes over one engine per model.
pub mod error;
pub mod generate;
pub mod openai;
pub mod routes;
pub mod validate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Notify;

use crate::config::Config;
use crate::engine::{Engine, EngineHandle};
use crate::error::{HearthError, Result};
use crate::model::Model;

pub struct AppState {
    /// Set once every model is loaded.
    pub engines: OnceLock<Vec<(String, EngineHandle)>>,
    pub shutting_down: AtomicBool,
    pub prometheus: PrometheusHandle,
    pub created: u64,
    pub limits: validate::Limits,
    /// Requests that may tokenize at once (on the blocking pool).
    pub tokenize_permits: tokio::sync::Semaphore,
}

pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Arc<Notify>,
    serve: tokio::task::JoinHandle<()>,
    loader: tokio::task::JoinHandle<Result<()>>,
}

pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn load_all(config: &Config, device: &Device) -> Result<Vec<(String, EngineHandle)>> {
    let total = config.models.len();
    let mut engines = Vec::with_capacity(total);
    for (i, m) in config.models.iter().enumerate() {
        let t0 = Instant::now();
        tracing::info!(model = %m.name, path = %m.path.display(), "loading model {}/{total}", i + 1);
        let model = Model::load(&m.path, &m.name, device)?;
        let engine = Engine::start(model, config.engine())?;
        tracing::info!(model = %m.name, secs = t0.elapsed().as_secs_f32(), "model {}/{total} ready", i + 1);
        engines.push((m.name.clone(), engine));
    }
    Ok(engines)
}

impl Server {
    /// Bind, start serving (/health answers at once), and load the models in the background;
    /// /ready turns 200 when they are loaded.
    pub async fn start(config: Config, device: Device) -> Result<Self> {
        let state = Arc::new(AppState {
            engines: OnceLock::new(),
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
        });
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port)).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening");
        let stop = Arc::new(Notify::new());
        let app = router(state.clone(), config.max_body_bytes);
        let stop_signal = stop.clone();
        let serve = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop_signal.notified().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "server error");
            }
        });
        let loader_state = state.clone();
        let loader = tokio::task::spawn_blocking(move || {
            let engines = load_all(&config, &device)?;
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

    /// Stop accepting, let in-flight requests finish for up to `drain`, then return.
    pub async fn shutdown(self, drain: Duration) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
        self.stop.notify_one();
        if tokio::time::timeout(drain, self.serve).await.is_err() {
            tracing::warn!(?drain, "drain timeout: exiting with requests still running");
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

/// `hearth serve`: run until SIGTERM / SIGINT, then drain and return.
pub async fn run(config: Config, device: Device) -> Result<()> {
    let drain = Duration::from_secs(config.drain_timeout_secs);
    let mut server = Server::start(config, device).await?;
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
