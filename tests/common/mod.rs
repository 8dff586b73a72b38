//! Shared helpers for the real-model tests: model paths and engine set-up.
#![allow(dead_code)]
pub mod postgres;
use std::path::{Path, PathBuf};

use std::io::{BufRead, BufReader};

use candle_core::Device;
use hearth::engine::{Engine, EngineConfig, EngineHandle, Request, SamplingParams};
use hearth::model::{AttentionBackend, Batch, Model};
use serde_json::Value;

pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("HEARTH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    assert!(
        dir.join("smollm2-135m-instruct-q4_1.gguf").exists(),
        "models missing in {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

pub fn smollm2() -> PathBuf {
    models_dir().join("smollm2-135m-instruct-q4_1.gguf")
}

pub fn gemma3() -> PathBuf {
    models_dir().join("gemma-3-270m-q4_k_m.gguf")
}

/// Both default models, SmolLM2 then Gemma 3, under the given names.
pub fn both_models(smol: &str, gemma: &str) -> Vec<hearth::config::ModelEntry> {
    vec![
        hearth::config::ModelEntry::new(smol, smollm2()),
        hearth::config::ModelEntry::new(gemma, gemma3()),
    ]
}

/// A route group over `small` then `large` whose thresholds no answer passes: every request
/// escalates after two probe tokens.
pub fn always_escalates(name: &str, small: &str, large: &str) -> hearth::router::RouteConfig {
    hearth::router::RouteConfig {
        name: name.into(),
        models: vec![small.into(), large.into()],
        probe_tokens: 2,
        escalate_below: hearth::router::Thresholds {
            logprob_p10: 1.0,
            margin_p25: f32::MAX,
        },
        ..Default::default()
    }
}

pub fn load(path: &Path) -> Model {
    Model::load(path, "test", &Device::Cpu).expect("model loads")
}

pub fn engine(path: &Path, cfg: EngineConfig) -> EngineHandle {
    Engine::start(load(path), cfg).expect("engine starts")
}

/// Greedy tokens for `prompt` (ids), `n` of them (fewer if EOS comes first).
pub fn greedy(e: &EngineHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    greedy_with(e, prompt, n, false)
}

/// Greedy with EOS ignored, so every run yields exactly `n` tokens.
pub fn greedy_n(e: &EngineHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    greedy_with(e, prompt, n, true)
}

fn greedy_with(e: &EngineHandle, prompt: &[u32], n: usize, ignore_eos: bool) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens: Some(n),
        ignore_eos,
        ..SamplingParams::greedy()
    };
    let (toks, _, _) = e
        .generate(Request::new(prompt.to_vec(), params))
        .expect("generation succeeds");
    toks.iter().map(|s| s.token).collect()
}

/// Wait (bounded) until the engine has no work; cancelled requests are reaped at the next step.
pub fn wait_idle(e: &EngineHandle) {
    let t0 = std::time::Instant::now();
    while !(e.is_idle() && e.free_blocks() == e.total_blocks()) {
        assert!(t0.elapsed().as_secs() < 120, "engine did not go idle");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is 17 times 23?\nAnswer:",
    "In 1492, Columbus sailed across the Atlantic Ocean. The voyage",
];

/// A Hearth server on a random local port, with its own tokio runtime.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<hearth::server::Server>,
    pub base: String,
}

impl TestServer {
    pub fn start(cfg: hearth::config::Config) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Each server keeps its usage ledger in a file of its own (not in the repository).
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let ledger_path = match cfg.ledger_path {
            Some(p) if p.as_os_str() != hearth::config::DEFAULT_LEDGER => Some(p),
            None => None,
            Some(_) => Some(std::env::temp_dir().join(format!(
                "hearth-test-{}-{}/usage.sqlite3",
                std::process::id(),
                SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))),
        };
        let cfg = hearth::config::Config {
            host: "127.0.0.1".into(),
            port: 0,
            ledger_path,
            ..cfg
        };
        let mut server = rt
            .block_on(hearth::server::Server::start(cfg, Device::Cpu))
            .expect("server starts");
        rt.block_on(server.wait_ready()).expect("models load");
        let base = format!("http://{}", server.addr);
        Self {
            rt,
            server: Some(server),
            base,
        }
    }

    /// SmolLM2 only (fast), under the name `smol`.
    pub fn smol(f: impl FnOnce(&mut hearth::config::Config)) -> Self {
        Self::named("smol", f)
    }

    /// SmolLM2 under `name`. Metrics are process-wide, so tests that read them use their own name.
    pub fn named(name: &str, f: impl FnOnce(&mut hearth::config::Config)) -> Self {
        let mut cfg = hearth::config::Config {
            models: vec![hearth::config::ModelEntry::new(name, smollm2())],
            ..Default::default()
        };
        f(&mut cfg);
        Self::start(cfg)
    }

    /// A Prometheus sample's value, e.g. `hearth_kv_cache_free_blocks{model="smol"}`.
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        let text = ureq::get(&format!("{}/metrics", self.base))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// Next-token logits after `ids` (at most 1024 tokens), from one forward of the whole prompt.
pub fn last_logits(m: &Model, ids: &[u32], backend: AttentionBackend) -> Vec<f32> {
    let kv = m.decoder.new_kv_cache(64, 16).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let mut b = Batch::new(16);
    b.push(ids, 0, &table, true);
    m.decoder
        .forward(&b, &kv, backend)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest absolute element-wise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

// HTTP helpers for tests against a running server.

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A GET's body as text.
pub fn get_text(base: &str, path: &str) -> String {
    agent()
        .get(&format!("{base}{path}"))
        .call()
        .expect("request sent")
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// Wait (up to a minute) until `model` has nothing running or waiting, as /metrics tells.
pub fn wait_idle_http(base: &str, model: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let text = get_text(base, "/metrics");
        let busy = text.lines().any(|l| {
            (l.starts_with("hearth_num_requests_running{")
                || l.starts_with("hearth_num_requests_waiting{"))
                && l.contains(&format!("model=\"{model}\""))
                && !l.ends_with(" 0")
        });
        if !busy {
            return;
        }
        assert!(t0.elapsed().as_secs() < 60, "{model} never went idle");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn post(base: &str, path: &str, body: &str) -> (u16, Value, Option<String>) {
    let mut r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .expect("request sent");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        retry,
    )
}

pub fn get(base: &str, path: &str) -> (u16, Value) {
    let mut r = agent()
        .get(&format!("{base}{path}"))
        .call()
        .expect("request sent");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Every `data:` payload of an SSE response, in order.
pub fn sse(base: &str, path: &str, body: &Value) -> Vec<String> {
    sse_as(base, path, body, None)
}

/// `sse` with `Authorization: Bearer key`.
pub fn sse_with_key(base: &str, path: &str, body: &Value, key: &str) -> Vec<String> {
    sse_as(base, path, body, Some(key))
}

fn sse_as(base: &str, path: &str, body: &Value, key: Option<&str>) -> Vec<String> {
    let mut rq = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        rq = rq.header("authorization", &format!("Bearer {k}"));
    }
    let mut r = rq.send(body.to_string()).expect("request sent");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    BufReader::new(r.body_mut().as_reader())
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

/// Status, JSON body and the `www-authenticate` header of a request with an optional key.
pub fn call(
    base: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value, Option<String>) {
    let url = format!("{base}{path}");
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut r = match (method, body) {
        ("GET", _) => {
            let mut rq = agent().get(&url);
            if let Some(a) = &auth {
                rq = rq.header("authorization", a);
            }
            rq.call()
        }
        (_, b) => {
            let mut rq = agent()
                .post(&url)
                .header("content-type", "application/json");
            if let Some(a) = &auth {
                rq = rq.header("authorization", a);
            }
            rq.send(b.map(Value::to_string).unwrap_or_default())
        }
    }
    .expect("request sent");
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        www,
    )
}
