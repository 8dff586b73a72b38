//! The response cache over real HTTP on SmolLM2 with the embedding model: an identical request is
//! an exact hit with the same text (JSON and streamed), a paraphrase hits only with the semantic
//! level on, near misses (another country, another number) and another tenant never hit,
//! sampling without a seed bypasses, the client header opts out or raises the threshold, entries
//! expire, and a hit is a ledger row with no device time and the time it saved.
mod common;

use common::TestServer;
use hearth::cache::{CacheConfig, CacheSettings};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const MODEL: &str = "cached";

fn server(semantic: bool, ttl_secs: u64, ledger: Option<std::path::PathBuf>) -> TestServer {
    server_named(MODEL, semantic, ttl_secs, ledger)
}

/// A server whose model has a name of its own: gauges are per model, and the tests of this file
/// share one process.
fn server_named(
    name: &str,
    semantic: bool,
    ttl_secs: u64,
    ledger: Option<std::path::PathBuf>,
) -> TestServer {
    TestServer::named(name, move |c| {
        c.cache = CacheConfig {
            exact: true,
            semantic,
            ttl_secs,
            ..Default::default()
        };
        c.tenants = vec![
            TenantConfig::new("team-a", &["sk-a"]),
            TenantConfig::new("team-b", &["sk-b"]),
            TenantConfig {
                cache: Some(CacheSettings {
                    exact: Some(false),
                    semantic: Some(false),
                    ..Default::default()
                }),
                ..TenantConfig::new("team-off", &["sk-off"])
            },
        ];
        if let Some(l) = ledger {
            c.ledger_path = Some(l);
        }
    })
}

fn both_levels() -> CacheConfig {
    CacheConfig {
        exact: true,
        semantic: true,
        ..Default::default()
    }
}

fn embedder(name: &str) -> hearth::config::EmbeddingModelEntry {
    hearth::config::EmbeddingModelEntry {
        name: name.into(),
        path: common::models_dir().join("all-minilm-l6-v2"),
        // What the default configuration's cache embeds with.
        adapter: Some("questions".into()),
    }
}

/// A chat request's body, headers and status.
struct Answer {
    status: u16,
    cache: Option<String>,
    body: Value,
}

impl Answer {
    fn text(&self) -> &str {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
    }
    fn cache(&self) -> &Value {
        &self.body["metrics"]["cache"]
    }
}

/// The chat request `ask` sends: greedy, 16 tokens, `extra`'s fields on top.
fn chat_body(question: &str, extra: &Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Answer in one short sentence."},
                     {"role": "user", "content": question}],
        "max_tokens": 16,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn ask(s: &TestServer, key: &str, question: &str, extra: Value, header: Option<&str>) -> Answer {
    let body = chat_body(question, &extra);
    let mut rq = common::agent()
        .post(&format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .header("authorization", &format!("Bearer {key}"));
    if let Some(h) = header {
        rq = rq.header("x-hearth-cache", h);
    }
    let mut r = rq.send(body.to_string()).unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-hearth-cache")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.body_mut().read_to_string().unwrap();
    Answer {
        status,
        cache,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

const Q: &str = "What is the capital of France?";

#[test]
fn exact_hits_replay_the_answer_to_the_same_tenant_only() {
    let dir = std::env::temp_dir().join(format!("hearth-rc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = server(false, 3600, Some(dir.join("usage.sqlite3")));
    let first = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    assert!(!first.text().is_empty());
    let device = first.body["metrics"]["device_time_ms"].as_f64().unwrap();
    assert!(device > 0.0);

    let again = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(again.cache.as_deref(), Some("hit"));
    assert_eq!(again.text(), first.text());
    assert_eq!(
        again.body["usage"], first.body["usage"],
        "the original usage"
    );
    assert_eq!(again.cache()["kind"], "exact");
    assert_eq!(again.cache()["similarity"], 1.0);
    assert!((again.cache()["saved_device_time_ms"].as_f64().unwrap() - device).abs() < 1e-6);
    assert_eq!(again.body["metrics"]["device_time_ms"], 0.0);
    assert_ne!(again.body["id"], first.body["id"]);

    // Streamed, the hit is the same text in the stream's own shape.
    let events = common::sse_with_key(
        &s.base,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": Q}], "max_tokens": 16, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}),
        "sk-a",
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, first.text());
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"], first.body["usage"]);
    assert_eq!(last["metrics"]["cache"]["status"], "hit");

    // Never for another tenant; never for a tenant whose settings turn the cache off.
    let b = ask(&s, "sk-b", Q, json!({}), None);
    assert_eq!(b.cache.as_deref(), Some("miss"));
    let off = ask(&s, "sk-off", Q, json!({}), None);
    assert_eq!(off.cache, None);
    assert!(off.body["metrics"].get("cache").is_none());

    // Sampling without a seed bypasses; with a seed it is cached like greedy.
    let sampled = ask(&s, "sk-a", Q, json!({"temperature": 0.7}), None);
    assert_eq!(sampled.cache.as_deref(), Some("bypass"));
    assert_eq!(sampled.cache()["bypass_reason"], "sampled without a seed");
    let seeded = json!({"temperature": 0.7, "seed": 11});
    assert_eq!(
        ask(&s, "sk-a", Q, seeded.clone(), None).cache.as_deref(),
        Some("miss")
    );
    let seeded_again = ask(&s, "sk-a", Q, seeded, None);
    assert_eq!(seeded_again.cache.as_deref(), Some("hit"));
    // The client opts out; a bad header value is a 400.
    let opted = ask(&s, "sk-a", Q, json!({}), Some("bypass"));
    assert_eq!(opted.cache.as_deref(), Some("bypass"));
    assert_eq!(opted.text(), first.text(), "greedy is deterministic");
    assert_eq!(ask(&s, "sk-a", Q, json!({}), Some("please")).status, 400);
    // Another question is not the same request.
    let other = ask(&s, "sk-a", "What is the capital of Spain?", json!({}), None);
    assert_eq!(other.cache.as_deref(), Some("miss"));

    // The ledger: hits are rows with no device time and the time they saved.
    let (status, v, _) = common::call(
        &s.base,
        "GET",
        "/v1/usage?group_by=tenant",
        Some("sk-a"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let row = &v["data"][0];
    assert_eq!(row["cache_hits"], 3, "{row}");
    assert!(row["saved_device_time_ms"].as_f64().unwrap() >= 2.0 * device);
    let hits = s
        .metric("hearth_response_cache_requests_total{result=\"hit\",kind=\"exact\"}")
        .unwrap_or(0.0);
    assert!(hits >= 3.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn paraphrases_hit_only_with_the_semantic_level_and_near_misses_never() {
    let exact_only = server(false, 3600, None);
    let semantic = server(true, 3600, None);
    for s in [&exact_only, &semantic] {
        assert_eq!(
            ask(s, "sk-a", Q, json!({}), None).cache.as_deref(),
            Some("miss")
        );
        let q = "What is 17 times 23?";
        assert_eq!(
            ask(s, "sk-a", q, json!({}), None).cache.as_deref(),
            Some("miss")
        );
    }
    let paraphrase = "what's the capital city of France?";
    assert_eq!(
        ask(&exact_only, "sk-a", paraphrase, json!({}), None)
            .cache
            .as_deref(),
        Some("miss")
    );
    let first = ask(&semantic, "sk-a", Q, json!({}), None);
    let hit = ask(&semantic, "sk-a", paraphrase, json!({}), None);
    assert_eq!(hit.cache.as_deref(), Some("hit"), "{}", hit.body);
    assert_eq!(hit.cache()["kind"], "semantic");
    assert_eq!(hit.text(), first.text());
    let sim = hit.cache()["similarity"].as_f64().unwrap();
    assert!(sim < 1.0 && sim >= f64::from(hearth::cache::DEFAULT_THRESHOLD));
    // The semantic lookup's embedding is the hit's only device time.
    let lookup = hit.cache()["lookup_device_time_ms"].as_f64().unwrap();
    assert!(lookup > 0.0);
    assert_eq!(
        hit.body["metrics"]["device_time_ms"].as_f64().unwrap(),
        lookup
    );
    // Raising the threshold above the pair's similarity turns the hit into a miss.
    let strict = ask(
        &semantic,
        "sk-a",
        paraphrase,
        json!({}),
        Some("min-similarity=0.999"),
    );
    assert_eq!(strict.cache.as_deref(), Some("miss"));
    // Near misses: another country, another number; and another tenant.
    for near in ["What is the capital of Germany?", "What is 17 times 24?"] {
        let a = ask(&semantic, "sk-a", near, json!({}), None);
        assert_eq!(a.cache.as_deref(), Some("miss"), "{near}: {}", a.body);
    }
    assert_eq!(
        ask(&semantic, "sk-b", paraphrase, json!({}), None)
            .cache
            .as_deref(),
        Some("miss")
    );
    // Another system prompt is another context: no semantic hit.
    let other_system = ask(
        &semantic,
        "sk-a",
        paraphrase,
        json!({"messages": [{"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": paraphrase}]}),
        None,
    );
    assert_eq!(other_system.cache.as_deref(), Some("miss"));
}

#[test]
fn entries_expire_after_the_ttl() {
    let s = server(true, 1, None);
    assert_eq!(
        ask(&s, "sk-a", Q, json!({}), None).cache.as_deref(),
        Some("miss")
    );
    assert_eq!(
        ask(&s, "sk-a", Q, json!({}), None).cache.as_deref(),
        Some("hit")
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(
        ask(&s, "sk-a", Q, json!({}), None).cache.as_deref(),
        Some("miss")
    );
}

#[test]
fn a_persisted_cache_survives_a_restart_for_its_tenant_only() {
    let dir = std::env::temp_dir().join(format!("hearth-rc-persist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger = dir.join("usage.sqlite3");
    let start = |ledger: std::path::PathBuf| {
        TestServer::named(MODEL, move |c| {
            c.cache = CacheConfig {
                exact: true,
                semantic: true,
                persist: true,
                ..Default::default()
            };
            c.tenants = vec![
                TenantConfig::new("team-a", &["sk-a"]),
                TenantConfig::new("team-b", &["sk-b"]),
            ];
            c.ledger_path = Some(ledger);
        })
    };
    let mut s = start(ledger.clone());
    let first = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let running = s.server.take().unwrap();
    s.rt.block_on(running.shutdown(std::time::Duration::from_secs(5)));
    drop(s);
    assert_eq!(hearth::cache::persist::count(&ledger), 1);

    let s = start(ledger.clone());
    let again = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(again.cache.as_deref(), Some("hit"), "{}", again.body);
    assert_eq!(again.text(), first.text());
    let paraphrase = ask(
        &s,
        "sk-a",
        "what's the capital city of France?",
        json!({}),
        None,
    );
    assert_eq!(
        paraphrase.cache.as_deref(),
        Some("hit"),
        "the vector is kept too"
    );
    assert_eq!(paraphrase.cache()["kind"], "semantic");
    assert_eq!(
        ask(&s, "sk-b", Q, json!({}), None).cache.as_deref(),
        Some("miss")
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_semantic_lookup_that_cannot_run_falls_back_to_the_exact_level() {
    // One queue place per model: a long embedding request holds the embedding model's.
    let s = TestServer::named(MODEL, |c| {
        c.cache = both_levels();
        c.max_waiting = 1;
        // Its own name: metrics are one registry per test process.
        c.embedding_models = vec![embedder("minilm-fallback")];
        c.tenants = vec![TenantConfig::new("team-a", &["sk-a"])];
    });
    let first = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let base = s.base.clone();
    let busy = std::thread::spawn(move || {
        let inputs: Vec<String> = (0..160)
            .map(|i| {
                format!(
                    "document {i}: {}",
                    "a long passage about nothing ".repeat(20)
                )
            })
            .collect();
        let body = json!({"model": "minilm-fallback", "input": inputs});
        common::agent()
            .post(&format!("{base}/v1/embeddings"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-a")
            .send(body.to_string())
            .map(|r| r.status().as_u16())
    });
    let waiting = "hearth_num_requests_waiting{model=\"minilm-fallback\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while s.metric(waiting).unwrap_or(0.0) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the embedding request never queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The exact level needs no embedding: still a hit.
    let again = ask(&s, "sk-a", Q, json!({}), None);
    assert_eq!(again.cache.as_deref(), Some("hit"));
    // A paraphrase cannot be embedded now: answered by the model, not refused.
    let para = ask(
        &s,
        "sk-a",
        "what's the capital city of France?",
        json!({}),
        None,
    );
    assert_eq!(para.status, 200, "{}", para.body);
    assert_eq!(para.cache.as_deref(), Some("miss"));
    assert!(!para.text().is_empty());
    assert_eq!(
        s.metric("hearth_response_cache_requests_total{result=\"error\",kind=\"semantic\"}"),
        Some(1.0)
    );
    assert_eq!(busy.join().unwrap().ok(), Some(200));
}

#[test]
fn a_refused_request_spends_nothing_on_the_cache() {
    let s = TestServer::named(MODEL, |c| {
        c.cache = both_levels();
        c.embedding_models = vec![embedder("minilm-refusal")];
        c.tenants = vec![TenantConfig {
            requests_per_minute: Some(1),
            ..TenantConfig::new("team-a", &["sk-a"])
        }];
    });
    assert_eq!(
        ask(&s, "sk-a", Q, json!({}), None).cache.as_deref(),
        Some("miss")
    );
    let batches = "hearth_embedding_batches_total{model=\"minilm-refusal\"}";
    assert_eq!(s.metric(batches), Some(1.0));
    let refused = ask(&s, "sk-a", "What is 17 times 23?", json!({}), None);
    assert_eq!(refused.status, 429, "{}", refused.body);
    // No lookup ran for it: no embedding.
    assert_eq!(s.metric(batches), Some(1.0));
}

#[test]
fn identical_requests_at_once_are_generated_once() {
    let s = server(false, 3600, None);
    let q = "Name the largest planet of the solar system.";
    let n = 4;
    let gate = std::sync::Barrier::new(n);
    let answers: Vec<(Answer, std::time::Instant, std::time::Instant)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                sc.spawn(|| {
                    gate.wait();
                    let t0 = std::time::Instant::now();
                    let a = ask(&s, "sk-a", q, json!({}), None);
                    (a, t0, std::time::Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let misses: Vec<_> = answers
        .iter()
        .filter(|(a, ..)| a.cache.as_deref() == Some("miss"))
        .collect();
    assert_eq!(misses.len(), 1, "one generation for the burst");
    let (first, _, first_done) = misses[0];
    let device = first.body["metrics"]["device_time_ms"].as_f64().unwrap();
    assert!(device > 0.0);
    for (a, started, _) in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.text(), first.text());
        if a.cache.as_deref() == Some("hit") {
            assert_eq!(a.cache()["kind"], "exact");
            assert_eq!(a.body["metrics"]["device_time_ms"], 0.0);
            assert_eq!(a.body["usage"], first.body["usage"]);
        }
        // All were asked while the one answer was being generated: they waited for it.
        assert!(started < first_done);
    }
    // Another tenant's same request is its own generation.
    assert_eq!(
        ask(&s, "sk-b", q, json!({}), None).cache.as_deref(),
        Some("miss")
    );
}

#[test]
fn a_request_waiting_for_one_whose_client_left_generates_its_own_answer() {
    use std::io::BufRead;
    const NAME: &str = "cached-wait";
    let s = server_named(NAME, false, 3600, None);
    let q = "Describe the water cycle.";
    let long = json!({"model": NAME, "max_tokens": 96, "ignore_eos": true});
    // The same request as the waiter's (streaming is not part of the key).
    let mut body = chat_body(q, &long);
    body["stream"] = json!(true);
    std::thread::scope(|sc| {
        let mut r = common::agent()
            .post(&format!("{}/v1/chat/completions", s.base))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-a")
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut lines = std::io::BufReader::new(r.body_mut().as_reader()).lines();
        for _ in 0..4 {
            lines.next();
        }
        let follower = sc.spawn(|| ask(&s, "sk-a", q, long.clone(), None));
        // The same request waits for the streaming one instead of running beside it.
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(!follower.is_finished());
        let running = format!("hearth_num_requests_running{{model=\"{NAME}\"}}");
        assert_eq!(s.metric(&running), Some(1.0));
        // Its client leaves: the waiter is woken, finds no answer and generates its own.
        drop(lines);
        drop(r);
        let a = follower.join().unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.cache.as_deref(), Some("miss"));
        assert_eq!(a.body["usage"]["completion_tokens"], 96);
    });
}
