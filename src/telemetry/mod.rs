//! Tracing set-up and every metric name, in one place. Names follow vLLM's, with a `hearth_` prefix and a
//! `model` label.
pub mod trace;

pub mod names {
    pub const REQUESTS_RUNNING: &str = "hearth_num_requests_running";
    pub const REQUESTS_WAITING: &str = "hearth_num_requests_waiting";
    pub const TIME_TO_FIRST_TOKEN: &str = "hearth_time_to_first_token_seconds";
    pub const INTER_TOKEN_LATENCY: &str = "hearth_inter_token_latency_seconds";
    pub const E2E_LATENCY: &str = "hearth_e2e_request_latency_seconds";
    pub const QUEUE_TIME: &str = "hearth_request_queue_time_seconds";
    pub const PROMPT_TOKENS: &str = "hearth_prompt_tokens_total";
    pub const GENERATION_TOKENS: &str = "hearth_generation_tokens_total";
    pub const REQUESTS_FINISHED: &str = "hearth_request_success_total";
    pub const KV_CACHE_USAGE: &str = "hearth_kv_cache_usage_perc";
    pub const KV_BLOCKS_FREE: &str = "hearth_kv_cache_free_blocks";
    pub const KV_BLOCKS_CACHED: &str = "hearth_kv_cache_cached_blocks";
    pub const KV_BLOCKS_TOTAL: &str = "hearth_kv_cache_total_blocks";
    pub const PREFIX_QUERIES: &str = "hearth_prefix_cache_queries_total";
    pub const PREFIX_HITS: &str = "hearth_prefix_cache_hits_total";
    pub const PREEMPTIONS: &str = "hearth_num_preemptions_total";
    pub const ENGINE_STEPS: &str = "hearth_engine_steps_total";
    /// Device time of engine steps (CUDA events on a GPU, the forward's wall time on the CPU).
    pub const ENGINE_DEVICE_SECONDS: &str = "hearth_engine_device_seconds_total";
    /// The same time split over the tenants whose requests ran (see `engine::metering`).
    pub const TENANT_DEVICE_SECONDS: &str = "hearth_tenant_device_seconds_total";
    /// Tokens by tenant, model and kind (prompt, cached, completion).
    pub const TENANT_TOKENS: &str = "hearth_tenant_tokens_total";
    /// Inference requests by tenant, model and HTTP status.
    pub const TENANT_REQUESTS: &str = "hearth_tenant_requests_total";
    /// Requests whose prompts were tokenized (a refused request never gets here).
    pub const TOKENIZED_REQUESTS: &str = "hearth_tokenized_requests_total";
    /// Requests refused for a missing or unknown API key (counted only: no tenant to bill).
    pub const UNAUTHORIZED_REQUESTS: &str = "hearth_unauthorized_requests_total";
    /// Usage-ledger rows committed, rows waiting in memory for an unwritable store, and rows
    /// lost (past the wait's bound).
    pub const LEDGER_ROWS_WRITTEN: &str = "hearth_ledger_rows_written_total";
    pub const LEDGER_ROWS_PENDING: &str = "hearth_ledger_rows_pending";
    pub const LEDGER_ROWS_DROPPED: &str = "hearth_ledger_rows_dropped_total";
    /// Requests refused before tokenization, by reason (`code`).
    pub const REJECTED_REQUESTS: &str = "hearth_rejected_requests_total";
    /// Forwards of an embedding model, and the inputs they embedded (inputs / batches is the
    /// batching across requests).
    pub const EMBEDDING_BATCHES: &str = "hearth_embedding_batches_total";
    pub const EMBEDDING_INPUTS: &str = "hearth_embedding_inputs_total";
    /// Response-cache lookups by `result` (hit, miss, bypass) and `kind` (exact or semantic for
    /// a hit; the levels searched for a miss; the reason for a bypass).
    pub const RESPONSE_CACHE: &str = "hearth_response_cache_requests_total";
    /// Similarity of the cached question to the asked one, per hit.
    pub const RESPONSE_CACHE_SIMILARITY: &str = "hearth_response_cache_hit_similarity";
    pub const RESPONSE_CACHE_SAVED_SECONDS: &str =
        "hearth_response_cache_saved_device_seconds_total";
    pub const RESPONSE_CACHE_ENTRIES: &str = "hearth_response_cache_entries";
    pub const RESPONSE_CACHE_BYTES: &str = "hearth_response_cache_bytes";
    /// Route-group decisions by answering model and reason (`confident`, `low_logprob`, ...).
    pub const ROUTER_DECISIONS: &str = "hearth_router_decisions_total";
    /// Escalations from one model of a route group to the next.
    pub const ROUTER_ESCALATIONS: &str = "hearth_router_escalations_total";
    /// CPU time of the router's own work per decision (signals, thresholds, starting the next
    /// model), the models' steps excluded.
    pub const ROUTER_DECISION_SECONDS: &str = "hearth_router_decision_seconds";
    /// Answer-quality signals per response, by answering model and route (see
    /// `server::quality`).
    pub const QUALITY_MEAN_LOGPROB: &str = "hearth_response_mean_logprob";
    pub const QUALITY_P10_LOGPROB: &str = "hearth_response_p10_logprob";
    pub const QUALITY_MIN_LOGPROB: &str = "hearth_response_min_logprob";
    pub const QUALITY_MEAN_ENTROPY: &str = "hearth_response_mean_entropy_nats";
    pub const QUALITY_MEAN_MARGIN: &str = "hearth_response_mean_top_margin";
    pub const QUALITY_REPETITION: &str = "hearth_response_repetition_ratio";
    pub const QUALITY_LENGTH_STOPS: &str = "hearth_response_length_stops_total";
    /// Each quality signal's mean per model over the last hour and the day before it, their
    /// difference, and the responses behind each window (see `quality::Drift`).
    pub const QUALITY_WINDOW_MEAN: &str = "hearth_quality_window_mean";
    pub const QUALITY_DRIFT: &str = "hearth_quality_drift";
    pub const QUALITY_WINDOW_RESPONSES: &str = "hearth_quality_window_responses";
    /// vLLM's names, which the Gateway API Inference Extension's endpoint picker (and llm-d's
    /// router) scrape: the same quantities as Hearth's own, labelled `model_name` as vLLM labels
    /// them.
    pub const VLLM_WAITING: &str = "vllm:num_requests_waiting";
    pub const VLLM_RUNNING: &str = "vllm:num_requests_running";
    pub const VLLM_KV_USAGE: &str = "vllm:kv_cache_usage_perc";
    pub const VLLM_CACHE_CONFIG: &str = "vllm:cache_config_info";
}

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric Hearth exports, with its kind and HELP text (Prometheus' linter wants one for
/// each, and dashboards show it). Units are in the names: seconds, bytes, tokens, blocks.
pub const CATALOG: &[(&str, Kind, &str)] = &[
    (
        names::REQUESTS_RUNNING,
        Kind::Gauge,
        "Requests in the model's running batch.",
    ),
    (
        names::REQUESTS_WAITING,
        Kind::Gauge,
        "Requests queued for the model, not yet admitted.",
    ),
    (
        names::TIME_TO_FIRST_TOKEN,
        Kind::Histogram,
        "Seconds from a request's arrival to its first generated token.",
    ),
    (
        names::INTER_TOKEN_LATENCY,
        Kind::Histogram,
        "Seconds between consecutive generated tokens of a request.",
    ),
    (
        names::E2E_LATENCY,
        Kind::Histogram,
        "Seconds from a request's arrival to its last token (or its embeddings).",
    ),
    (
        names::QUEUE_TIME,
        Kind::Histogram,
        "Seconds a request waited before the model first ran it.",
    ),
    (
        names::PROMPT_TOKENS,
        Kind::Counter,
        "Prompt tokens of finished requests (cached ones included).",
    ),
    (names::GENERATION_TOKENS, Kind::Counter, "Tokens generated."),
    (
        names::REQUESTS_FINISHED,
        Kind::Counter,
        "Requests (choices) that finished.",
    ),
    (
        names::KV_CACHE_USAGE,
        Kind::Gauge,
        "Share of the model's KV-cache blocks in use (0 to 1).",
    ),
    (
        names::KV_BLOCKS_FREE,
        Kind::Gauge,
        "KV-cache blocks free (including cached prefix blocks that may be evicted).",
    ),
    (
        names::KV_BLOCKS_CACHED,
        Kind::Gauge,
        "Free KV-cache blocks that still hold a reusable prefix.",
    ),
    (
        names::KV_BLOCKS_TOTAL,
        Kind::Gauge,
        "KV-cache blocks of the model.",
    ),
    (
        names::PREFIX_QUERIES,
        Kind::Counter,
        "Prompt tokens looked up in the prefix cache.",
    ),
    (
        names::PREFIX_HITS,
        Kind::Counter,
        "Prompt tokens found in the prefix cache (not computed again).",
    ),
    (
        names::PREEMPTIONS,
        Kind::Counter,
        "Sequences preempted (their blocks freed) to let others run.",
    ),
    (
        names::ENGINE_STEPS,
        Kind::Counter,
        "Engine steps (one forward over the running batch each).",
    ),
    (
        names::ENGINE_DEVICE_SECONDS,
        Kind::Counter,
        "Device time of engine steps (CUDA events on a GPU, the forward's wall time on the CPU).",
    ),
    (
        names::TENANT_DEVICE_SECONDS,
        Kind::Counter,
        "Engine device time split over the tenants whose requests shared each step.",
    ),
    (
        names::TENANT_TOKENS,
        Kind::Counter,
        "Tokens by tenant, model and kind (prompt, cached, completion).",
    ),
    (
        names::TENANT_REQUESTS,
        Kind::Counter,
        "Inference requests by tenant, model and HTTP status.",
    ),
    (
        names::TOKENIZED_REQUESTS,
        Kind::Counter,
        "Requests whose prompts were tokenized (refused ones never are).",
    ),
    (
        names::UNAUTHORIZED_REQUESTS,
        Kind::Counter,
        "Requests refused for a missing or unknown API key.",
    ),
    (
        names::LEDGER_ROWS_WRITTEN,
        Kind::Counter,
        "Usage-ledger rows committed.",
    ),
    (
        names::LEDGER_ROWS_DROPPED,
        Kind::Counter,
        "Usage-ledger rows lost: past the bound on rows waiting for an unwritable store, still waiting at shutdown, or refused by the store for their values.",
    ),
    (
        names::LEDGER_ROWS_PENDING,
        Kind::Gauge,
        "Usage-ledger rows waiting in memory for the store to be writable again.",
    ),
    (
        names::REJECTED_REQUESTS,
        Kind::Counter,
        "Requests refused before tokenization, by reason.",
    ),
    (
        names::EMBEDDING_BATCHES,
        Kind::Counter,
        "Forwards of an embedding model.",
    ),
    (
        names::EMBEDDING_INPUTS,
        Kind::Counter,
        "Inputs embedded (inputs per batch is the batching across requests).",
    ),
    (
        names::RESPONSE_CACHE,
        Kind::Counter,
        "Response-cache lookups by result (hit, miss, bypass, error) and kind.",
    ),
    (
        names::RESPONSE_CACHE_SIMILARITY,
        Kind::Histogram,
        "Similarity of the cached question to the asked one, per hit.",
    ),
    (
        names::RESPONSE_CACHE_SAVED_SECONDS,
        Kind::Counter,
        "Device time of the answers the response cache gave again (not spent again).",
    ),
    (
        names::RESPONSE_CACHE_ENTRIES,
        Kind::Gauge,
        "Answers held by the response cache.",
    ),
    (
        names::RESPONSE_CACHE_BYTES,
        Kind::Gauge,
        "Bytes held by the response cache.",
    ),
    (
        names::ROUTER_DECISIONS,
        Kind::Counter,
        "Route-group decisions by answering model and reason.",
    ),
    (
        names::ROUTER_ESCALATIONS,
        Kind::Counter,
        "Escalations from one model of a route group to the next, by reason.",
    ),
    (
        names::ROUTER_DECISION_SECONDS,
        Kind::Histogram,
        "CPU seconds of the router's own work per decision (the models' steps excluded).",
    ),
    (
        names::QUALITY_MEAN_LOGPROB,
        Kind::Histogram,
        "Mean log-probability of a response's generated tokens.",
    ),
    (
        names::QUALITY_P10_LOGPROB,
        Kind::Histogram,
        "10th percentile of a response's token log-probabilities.",
    ),
    (
        names::QUALITY_MIN_LOGPROB,
        Kind::Histogram,
        "Lowest log-probability among a response's generated tokens.",
    ),
    (
        names::QUALITY_MEAN_ENTROPY,
        Kind::Histogram,
        "Mean entropy (nats) of the distributions a response's tokens were picked from.",
    ),
    (
        names::QUALITY_MEAN_MARGIN,
        Kind::Histogram,
        "Mean gap between the best and second-best token log-probability, per response.",
    ),
    (
        names::QUALITY_REPETITION,
        Kind::Histogram,
        "Share of a response's 4-token sequences that repeat an earlier one (0 to 1).",
    ),
    (
        names::QUALITY_LENGTH_STOPS,
        Kind::Counter,
        "Responses that stopped on max_tokens or the context length.",
    ),
    (names::QUALITY_WINDOW_MEAN, Kind::Gauge, "Mean of a quality signal over the last hour (window 1h) or the day before it (window 24h)."),
    (names::QUALITY_DRIFT, Kind::Gauge, "A quality signal's last-hour mean minus its mean over the day before (0 while either window is empty)."),
    (
        names::VLLM_WAITING,
        Kind::Gauge,
        "Requests queued for the model, not yet admitted (vLLM's name, for inference gateways).",
    ),
    (
        names::VLLM_RUNNING,
        Kind::Gauge,
        "Requests in the model's running batch (vLLM's name, for inference gateways).",
    ),
    (
        names::VLLM_KV_USAGE,
        Kind::Gauge,
        "Share of the model's KV-cache blocks in use, 0 to 1 (vLLM's name, for inference gateways).",
    ),
    (
        names::VLLM_CACHE_CONFIG,
        Kind::Gauge,
        "The KV cache's block size and block count as labels (value 1; vLLM's name).",
    ),
    (names::QUALITY_WINDOW_RESPONSES, Kind::Gauge, "Responses behind the quality windows (1h, 24h)."),
];

/// The HELP text of `name`.
pub fn help(name: &str) -> &'static str {
    CATALOG
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or("", |(_, _, h)| h)
}

fn describe() {
    for &(name, kind, text) in CATALOG {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, text),
            Kind::Gauge => metrics::describe_gauge!(name, text),
            Kind::Histogram => metrics::describe_histogram!(name, text),
        }
    }
}

/// What the server serves, for the series that must exist from start-up.
pub struct Served<'a> {
    pub decoders: &'a [String],
    pub embedders: &'a [String],
    /// Route groups and their models, cheapest first.
    pub routes: &'a [(String, Vec<String>)],
    pub tenants: &'a [String],
}

/// Why a route group keeps a model's answer or escalates (see `router::signals`).
const ROUTE_REASONS: &[&str] = &["confident", "low_logprob", "low_margin", "no_tokens"];
/// Response-cache outcomes by kind (see `server::cached`).
const CACHE_RESULTS: &[(&str, &str)] = &[
    ("hit", "exact"),
    ("hit", "semantic"),
    ("miss", "exact"),
    ("miss", "semantic"),
    ("miss", "exact,semantic"),
    ("bypass", "client"),
    ("error", "semantic"),
];

/// Register every series of the served models, routes and tenants at zero (idempotent): a
/// dashboard or an alert never sees a gap where nothing happened yet.
pub fn zero_series(s: &Served) {
    // Registered once per set of names (start-up, then a reload that changes the tenants): a
    // scrape does not walk every tenant x model again.
    use std::hash::{Hash, Hasher};
    static DONE: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (s.decoders, s.embedders, s.routes, s.tenants).hash(&mut h);
    let key = h.finish();
    let mut done = DONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *done == Some(key) {
        return;
    }
    *done = Some(key);
    let per_model = |m: &str, decoder: bool| {
        let l = [("model", m.to_string())];
        for c in [names::PROMPT_TOKENS, names::REQUESTS_FINISHED] {
            metrics::counter!(c, &l).increment(0);
        }
        let _ = metrics::histogram!(names::E2E_LATENCY, &l);
        let _ = metrics::histogram!(names::QUEUE_TIME, &l);
        if decoder {
            metrics::counter!(names::GENERATION_TOKENS, &l).increment(0);
            let _ = metrics::histogram!(names::TIME_TO_FIRST_TOKEN, &l);
            let _ = metrics::histogram!(names::INTER_TOKEN_LATENCY, &l);
        }
    };
    s.decoders.iter().for_each(|m| per_model(m, true));
    // Quality signals: each model asked by name, and each route with each of its models.
    let quality = |model: &str, route: &str| {
        let l = [("model", model.to_string()), ("route", route.to_string())];
        for h in [
            names::QUALITY_MEAN_LOGPROB,
            names::QUALITY_P10_LOGPROB,
            names::QUALITY_MIN_LOGPROB,
            names::QUALITY_MEAN_ENTROPY,
            names::QUALITY_MEAN_MARGIN,
            names::QUALITY_REPETITION,
        ] {
            let _ = metrics::histogram!(h, &l);
        }
        metrics::counter!(names::QUALITY_LENGTH_STOPS, &l).increment(0);
    };
    s.decoders.iter().for_each(|m| quality(m, ""));
    for (route, models) in s.routes {
        models.iter().for_each(|m| quality(m, route));
    }
    s.embedders.iter().for_each(|m| per_model(m, false));
    let asked = s
        .decoders
        .iter()
        .chain(s.embedders)
        .chain(s.routes.iter().map(|(r, _)| r));
    for m in asked.clone() {
        metrics::counter!(names::TOKENIZED_REQUESTS, "model" => m.clone()).increment(0);
    }
    for t in s.tenants {
        for m in s.decoders.iter().chain(s.embedders) {
            for kind in ["prompt", "cached", "completion"] {
                metrics::counter!(names::TENANT_TOKENS, "tenant" => t.clone(), "model" => m.clone(), "kind" => kind)
                    .increment(0);
            }
        }
        for m in asked.clone() {
            metrics::counter!(names::TENANT_REQUESTS, "tenant" => t.clone(), "model" => m.clone(), "status" => "200")
                .increment(0);
        }
    }
    for (route, models) in s.routes {
        let _ = metrics::histogram!(names::ROUTER_DECISION_SECONDS, "route" => route.clone());
        for m in models {
            for reason in ROUTE_REASONS {
                metrics::counter!(names::ROUTER_DECISIONS, "route" => route.clone(), "model" => m.clone(), "reason" => *reason)
                    .increment(0);
            }
        }
        for pair in models.windows(2) {
            for reason in &ROUTE_REASONS[1..] {
                metrics::counter!(
                    names::ROUTER_ESCALATIONS,
                    "route" => route.clone(),
                    "from" => pair[0].clone(),
                    "to" => pair[1].clone(),
                    "reason" => *reason
                )
                .increment(0);
            }
        }
    }
    for (result, kind) in CACHE_RESULTS {
        metrics::counter!(names::RESPONSE_CACHE, "result" => *result, "kind" => *kind).increment(0);
    }
    for kind in ["exact", "semantic"] {
        let _ = metrics::histogram!(names::RESPONSE_CACHE_SIMILARITY, "kind" => kind);
    }
    for c in [
        names::UNAUTHORIZED_REQUESTS,
        names::LEDGER_ROWS_WRITTEN,
        names::LEDGER_ROWS_DROPPED,
    ] {
        metrics::counter!(c).increment(0);
    }
    metrics::gauge!(names::LEDGER_ROWS_PENDING).set(0.0);
}

/// A counter family with fractional values in Prometheus text format (the `metrics` crate's
/// counters are integers; seconds are the base unit promtool asks for).
pub fn render_seconds_counter(
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, f64)],
) -> String {
    let escape = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut out = format!("# HELP {name} {help}\n# TYPE {name} counter\n");
    for (labels, value) in samples {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            out.push_str(&format!("{name} {value}\n"));
        } else {
            out.push_str(&format!("{name}{{{}}} {value}\n", labels.join(",")));
        }
    }
    out
}

use std::sync::OnceLock;

/// The process-wide Prometheus recorder (installed once; later calls share it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0,
            ];
            let builder = [
                names::TIME_TO_FIRST_TOKEN,
                names::INTER_TOKEN_LATENCY,
                names::E2E_LATENCY,
                names::QUEUE_TIME,
            ]
            .iter()
            .fold(PrometheusBuilder::new(), |b, n| {
                b.set_buckets_for_metric(Matcher::Full(n.to_string()), &latency)
                    .unwrap_or_else(|_| PrometheusBuilder::new())
            });
            let logprob = [
                -8.0, -6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, -0.05, 0.0,
            ];
            let builder = [
                names::QUALITY_MEAN_LOGPROB,
                names::QUALITY_P10_LOGPROB,
                names::QUALITY_MIN_LOGPROB,
            ]
            .iter()
            .fold(builder, |b, n| {
                b.set_buckets_for_metric(Matcher::Full(n.to_string()), &logprob)
                    .unwrap_or_else(|_| PrometheusBuilder::new())
            });
            let spread = [0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0];
            let builder = [names::QUALITY_MEAN_ENTROPY, names::QUALITY_MEAN_MARGIN]
                .iter()
                .fold(builder, |b, n| {
                    b.set_buckets_for_metric(Matcher::Full(n.to_string()), &spread)
                        .unwrap_or_else(|_| PrometheusBuilder::new())
                });
            let ratio = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0];
            let builder = builder
                .set_buckets_for_metric(
                    Matcher::Full(names::QUALITY_REPETITION.to_string()),
                    &ratio,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let similarity = [0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0];
            let builder = builder
                .set_buckets_for_metric(
                    Matcher::Full(names::RESPONSE_CACHE_SIMILARITY.to_string()),
                    &similarity,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    h
                }
                // A recorder was installed elsewhere (tests): keep a detached one for rendering.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Logs to stderr, filtered by RUST_LOG (default: info for Hearth, warn for the rest).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hearth=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
