//! One typed configuration: CLI flags over a TOML file over defaults.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{EngineConfig, KvBudget, SchedulerConfig};
use crate::error::{HearthError, Result};
use crate::tenancy::{Directory, TenantConfig};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name clients use in the `model` field.
    pub name: String,
    /// A GGUF file or a safetensors folder.
    pub path: PathBuf,
    /// A Jinja chat template file used in place of the model's own (for instance one that renders
    /// `tools`, for a model whose file carries a template without them).
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Response-cache settings for requests that name this model, over the global `[cache]`.
    #[serde(default)]
    pub cache: Option<crate::cache::CacheSettings>,
}

impl ModelEntry {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            chat_template: None,
            cache: None,
        }
    }
}

/// An embedding model served at `/v1/embeddings`: a sentence-transformers folder (BERT).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingModelEntry {
    pub name: String,
    pub path: PathBuf,
    /// A low-rank adapter merged into the weights at load: `questions` (built in; tunes
    /// all-MiniLM-L6-v2 for matching questions, what the semantic cache does) or a safetensors
    /// file (`scripts/train_cache_adapter.py` writes one).
    pub adapter: Option<String>,
}

/// Where the usage ledger lives unless the config says otherwise (the data directory, relative
/// to the working directory).
pub const DEFAULT_LEDGER: &str = "data/usage.sqlite3";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub models: Vec<ModelEntry>,
    /// Embedding models (`[[embedding_models]]`), on the same device as the decoders.
    pub embedding_models: Vec<EmbeddingModelEntry>,
    /// Padded tokens (longest input x inputs) of one embedding forward.
    pub embedding_batch_tokens: usize,
    /// KV cache per model, in MiB; `kv_cache_fraction` instead takes a share of free memory.
    pub kv_cache_mib: usize,
    pub kv_cache_fraction: Option<f64>,
    pub block_size: usize,
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    /// Requests that may wait per model before new ones get 429.
    pub max_waiting: usize,
    pub prefix_caching: bool,
    /// max_tokens of a request that names none, clamped to what fits the context and the KV pool.
    pub default_max_tokens: usize,
    /// Cap on prompts x n x max_tokens of one request.
    pub max_request_tokens: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Seconds a client has to send a request head (also the idle keep-alive timeout).
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request body.
    pub body_read_timeout_secs: u64,
    /// Open connections; more are refused with 503. Unset: from the file-descriptor limit.
    pub max_connections: Option<usize>,
    /// Host names requests may address (DNS-rebinding protection). Empty: localhost names only when
    /// bound to loopback, any otherwise.
    pub allowed_hosts: Vec<String>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout_secs: u64,
    /// `cuda:N`, `metal`, `cpu`; unset: the best available.
    pub device: Option<String>,
    /// Keys that may read every tenant's usage (and the metrics when they need a key).
    pub admin_api_keys: Vec<String>,
    /// With none (and no admin key) the server runs open, every request as tenant `default`.
    pub tenants: Vec<TenantConfig>,
    /// Put /metrics behind an admin key (it is open by default, for Prometheus).
    pub metrics_require_key: bool,
    /// Serve HTTPS with this PEM certificate chain and private key (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The usage ledger (SQLite); unset: no ledger. With `ledger_url` set, only the response
    /// cache's persisted copy (`[cache] persist`) is kept in this file.
    pub ledger_path: Option<PathBuf>,
    /// The usage ledger in PostgreSQL (`postgres://user@host:5432/db`), shared by every replica;
    /// in place of the file. The environment's `HEARTH_LEDGER_URL` overrides it (`hearth serve`).
    pub ledger_url: Option<String>,
    /// PEM CA certificates that the ledger's PostgreSQL server is verified against
    /// (`sslmode=require`); unset: the web PKI roots.
    pub ledger_ca_file: Option<PathBuf>,
    /// Split each step's device time over its requests and keep the usage ledger. On by default;
    /// off only to measure what they cost (then responses report no device time and no rows).
    pub metering: bool,
    /// Route groups (`[[routes]]`); none: `auto` over every served model, cheapest first.
    pub routes: Vec<crate::router::RouteConfig>,
    /// Ledger rows older than this are pruned (0: kept forever).
    pub ledger_retention_days: u32,
    /// The response cache (`[cache]`); off unless turned on here, for a tenant, or for a route.
    pub cache: crate::cache::CacheConfig,
    /// Export request traces to this OpenTelemetry collector (e.g. `http://localhost:4318`);
    /// unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`.
    pub otlp_protocol: crate::telemetry::trace::OtlpProtocol,
    /// Put prompts and outputs in the spans (off: only sizes, timings and decisions leave).
    pub otlp_export_content: bool,
    /// Share of traces kept (0..1) when the client sent no sampled `traceparent`.
    pub otlp_sample_ratio: f64,
    /// Publish KV-cache events (vLLM's format) on a ZeroMQ PUB socket bound here, e.g.
    /// `tcp://10.0.0.5:5557`; unset: none. They carry prompt token ids of every tenant.
    pub kv_events_endpoint: Option<String>,
    /// The replay (ROUTER) socket, e.g. `tcp://10.0.0.5:5558`; unset: no replay.
    pub kv_events_replay_endpoint: Option<String>,
    /// The pod part of the events' topic `kv@<pod>@<model>` (default: `$POD_IP:<port>`, as
    /// llm-d's router names pods, else $POD_NAME, else $HOSTNAME).
    pub kv_events_pod: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            models: vec![
                ModelEntry::new(
                    "smollm2-135m-instruct",
                    "models/smollm2-135m-instruct-q4_1.gguf",
                ),
                ModelEntry::new("gemma-3-270m", "models/gemma-3-270m-q4_k_m.gguf"),
            ],
            // The base model (sentence-transformers' vectors) and, for the semantic cache, the
            // same model with the built-in question-matching adapter.
            embedding_models: vec![
                EmbeddingModelEntry {
                    name: "all-minilm-l6-v2".into(),
                    path: "models/all-minilm-l6-v2".into(),
                    adapter: None,
                },
                EmbeddingModelEntry {
                    name: "all-minilm-l6-v2-questions".into(),
                    path: "models/all-minilm-l6-v2".into(),
                    adapter: Some(crate::embedding::adapter::QUESTIONS.into()),
                },
            ],
            embedding_batch_tokens: 4096,
            kv_cache_mib: 512,
            kv_cache_fraction: None,
            block_size: 16,
            max_batch_tokens: 512,
            max_seqs: 256,
            max_waiting: 1024,
            prefix_caching: true,
            default_max_tokens: 1024,
            max_request_tokens: 262_144,
            max_body_bytes: 4 << 20,
            header_read_timeout_secs: 30,
            body_read_timeout_secs: 60,
            max_connections: None,
            allowed_hosts: Vec::new(),
            drain_timeout_secs: 30,
            device: None,
            admin_api_keys: Vec::new(),
            tenants: Vec::new(),
            metrics_require_key: false,
            tls_cert: None,
            tls_key: None,
            ledger_path: Some(DEFAULT_LEDGER.into()),
            ledger_url: None,
            ledger_ca_file: None,
            metering: true,
            routes: Vec::new(),
            ledger_retention_days: 400,
            cache: Default::default(),
            otlp_endpoint: None,
            otlp_protocol: Default::default(),
            otlp_export_content: false,
            otlp_sample_ratio: 1.0,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            kv_events_pod: None,
        }
    }
}

impl Config {
    /// Defaults, overridden by the TOML file at `path` if given.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| HearthError::Config(format!("cannot read {}: {e}", path.display())))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| HearthError::Config(format!("{}: {e}", path.display())))?;
        config.directory()?;
        config.check_routes()?;
        config.traces()?;
        config.ledger()?;
        Ok(config)
    }

    /// Model names are unique across decoders and embedding models; the route groups name
    /// served decoders only (and no model's name).
    pub fn check_routes(&self) -> Result<()> {
        let served: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        let mut names = served.clone();
        for e in &self.embedding_models {
            if names.contains(&e.name.as_str()) {
                return Err(HearthError::Config(format!(
                    "the model name `{}` is used twice",
                    e.name
                )));
            }
            names.push(&e.name);
        }
        if let Some(r) = self
            .routes
            .iter()
            .find(|r| names.contains(&r.name.as_str()))
        {
            return Err(HearthError::Config(format!(
                "route `{}`: a route needs a name that is not a model's",
                r.name
            )));
        }
        let levels: Vec<&crate::cache::CacheSettings> = (self.models.iter().map(|m| &m.cache))
            .chain(self.routes.iter().map(|r| &r.cache))
            .chain(self.tenants.iter().map(|t| &t.cache))
            .flatten()
            .collect();
        crate::cache::CacheConfig::check(&levels, &self.cache)?;
        if self.cache.persist && (self.ledger_path.is_none() || !self.metering) {
            return Err(HearthError::Config(
                "cache.persist keeps the cache in the usage ledger's file: it needs ledger_path (and metering)".into(),
            ));
        }
        if let Some(m) = &self.cache.embedding_model {
            if !self.embedding_models.iter().any(|e| &e.name == m) {
                return Err(HearthError::Config(format!(
                    "cache.embedding_model `{m}` is not one of the embedding_models"
                )));
            }
        }
        crate::router::Routes::check(&self.routes, &served)
    }

    /// The response-cache settings of each model and route name that has some.
    pub fn cache_by_name(&self) -> Vec<(String, crate::cache::CacheSettings)> {
        let models = self.models.iter().map(|m| (&m.name, &m.cache));
        let routes = self.routes.iter().map(|r| (&r.name, &r.cache));
        models
            .chain(routes)
            .filter_map(|(n, c)| c.clone().map(|c| (n.clone(), c)))
            .collect()
    }

    /// The tenants and keys this config names (checked: unique names and keys).
    pub fn directory(&self) -> Result<Directory> {
        Directory::new(&self.admin_api_keys, &self.tenants)
    }

    /// The TLS settings of `tls_cert` and `tls_key` (read from disk now), or None for plain HTTP.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::server::http::tls_config(cert, key)?)),
            (None, None) => Ok(None),
            _ => Err(HearthError::Config(
                "tls_cert and tls_key go together: set both or neither".into(),
            )),
        }
    }

    /// The KV-event publisher's settings, when `kv_events_endpoint` is set.
    pub fn kv_events(&self) -> Option<crate::kv_events::KvEventsConfig> {
        let endpoint = self.kv_events_endpoint.clone()?;
        let pod = self
            .kv_events_pod
            .clone()
            .or_else(|| {
                std::env::var("POD_IP")
                    .ok()
                    .map(|ip| format!("{ip}:{}", self.port))
            })
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "hearth".into());
        Some(crate::kv_events::KvEventsConfig {
            endpoint,
            replay_endpoint: self.kv_events_replay_endpoint.clone(),
            pod,
        })
    }

    /// Where the usage ledger is kept: PostgreSQL when `ledger_url` is set, else the file; none
    /// without metering.
    pub fn ledger(&self) -> Result<Option<crate::ledger::Target>> {
        if !self.metering {
            return Ok(None);
        }
        match (self.ledger_url.as_deref().filter(|u| !u.trim().is_empty()), &self.ledger_path) {
            (Some(url), _) if !crate::ledger::is_url(url) => Err(HearthError::Config(
                "ledger_url must be a postgres:// or postgresql:// URL (a file goes in ledger_path)"
                    .into(),
            )),
            (Some(url), _) => {
                crate::ledger::Target::parse(url, self.ledger_ca_file.as_deref()).map(Some)
            }
            (None, _) if self.ledger_ca_file.is_some() => Err(HearthError::Config(
                "ledger_ca_file is for a PostgreSQL ledger (ledger_url)".into(),
            )),
            (None, Some(path)) => Ok(Some(crate::ledger::Target::Sqlite(path.clone()))),
            (None, None) => Ok(None),
        }
    }

    /// The trace exporter's settings, when `otlp_endpoint` is set.
    pub fn traces(&self) -> Result<Option<crate::telemetry::trace::TraceConfig>> {
        let Some(endpoint) = self.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()) else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            return Err(HearthError::Config(format!(
                "otlp_sample_ratio must be between 0 and 1 (got {})",
                self.otlp_sample_ratio
            )));
        }
        // The exporters are built without TLS: a collector is reached over a trusted network or
        // through a local agent.
        if !endpoint.starts_with("http://") {
            return Err(HearthError::Config(format!(
                "otlp_endpoint `{endpoint}` must be an http:// URL (TLS to the collector is not \
                 built in: run a collector or agent next to Hearth)"
            )));
        }
        Ok(Some(crate::telemetry::trace::TraceConfig {
            endpoint,
            protocol: self.otlp_protocol,
            content: self.otlp_export_content,
            sample_ratio: self.otlp_sample_ratio,
        }))
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            num_blocks: None,
            kv_budget: match self.kv_cache_fraction {
                Some(f) => KvBudget::FreeFraction(f),
                None => KvBudget::Bytes(self.kv_cache_mib << 20),
            },
            scheduler: SchedulerConfig {
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
                max_waiting: self.max_waiting,
            },
            backend: None,
            prefix_caching: self.prefix_caching,
            default_max_tokens: self.default_max_tokens,
            metering: self.metering,
            kv_events: None,
        }
    }
}

impl Config {
    /// What one request may ask for.
    pub fn limits(&self) -> crate::server::validate::Limits {
        crate::server::validate::Limits {
            max_request_tokens: self.max_request_tokens,
            default_max_tokens: self.default_max_tokens,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config =
            toml::from_str("port = 9000\n[[models]]\nname = \"m\"\npath = \"/x.gguf\"\n").unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.models.len(), 1);
        assert!(toml::from_str::<Config>("prot = 1").is_err());
    }

    #[test]
    fn embedding_models_parse_and_names_stay_unique() {
        let c: Config = toml::from_str(
            "[[models]]\nname = \"m\"\npath = \"/m.gguf\"\n\
             [[embedding_models]]\nname = \"e\"\npath = \"/e\"\n\
             [[embedding_models]]\nname = \"q\"\npath = \"/e\"\nadapter = \"questions\"\n",
        )
        .unwrap();
        assert_eq!(c.embedding_models[0].name, "e");
        assert_eq!(c.embedding_models[0].adapter, None);
        assert_eq!(c.embedding_models[1].adapter.as_deref(), Some("questions"));
        assert_eq!(
            Config::default().embedding_models[1].adapter.as_deref(),
            Some(crate::embedding::adapter::QUESTIONS)
        );
        assert!(c.check_routes().is_ok());
        assert_eq!(
            Config::default().embedding_models[0].name,
            "all-minilm-l6-v2"
        );
        let mut twice = c.clone();
        twice.embedding_models[0].name = "m".into();
        assert!(matches!(twice.check_routes(), Err(HearthError::Config(_))));
        let mut route = c.clone();
        route.routes = vec![crate::router::RouteConfig {
            name: "e".into(),
            models: vec!["m".into()],
            ..Default::default()
        }];
        assert!(matches!(route.check_routes(), Err(HearthError::Config(_))));
    }

    #[test]
    fn tenants_parse_with_defaults_and_bad_ones_fail_to_load() {
        let c: Config = toml::from_str(
            "admin_api_keys = [\"sk-admin\"]\n[[tenants]]\nname = \"team-a\"\napi_keys = [\"sk-a\"]\n\
             requests_per_minute = 600\ntokens_per_minute = 200000\nmax_concurrent = 64\nweight = 2\n\
             [[tenants]]\nname = \"team-b\"\napi_keys = [\"sk-b\"]\n",
        )
        .unwrap();
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].requests_per_minute, Some(600));
        assert_eq!(c.tenants[0].weight, 2);
        assert_eq!(c.tenants[1].weight, 1);
        assert_eq!(c.tenants[1].max_concurrent, None);
        assert!(!c.directory().unwrap().is_open());
        assert!(Config::default().directory().unwrap().is_open());
        let dir = std::env::temp_dir().join(format!("hearth-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(
            &path,
            "[[tenants]]\nname = \"a\"\napi_keys = [\"k\", \"k\"]\n",
        )
        .unwrap();
        assert!(matches!(
            Config::load(Some(&path)),
            Err(HearthError::Config(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
