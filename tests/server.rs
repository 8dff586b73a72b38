//! The HTTP server over real HTTP on a random port: endpoints, streaming, errors and their statuses,
//! cancellation on disconnect, and draining on shutdown.
mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{agent, get, post, sse, TestServer};
use serde_json::{json, Value};

fn assert_error(v: &Value, code: Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(c) = code {
        assert_eq!(e["code"], c, "{v}");
    }
}

#[test]
fn endpoints_respond_and_both_default_models_load() {
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("smollm2-135m-instruct", "gemma-3-270m"),
        ..Default::default()
    });
    assert_eq!(get(&s.base, "/health").0, 200);
    assert_eq!(get(&s.base, "/ready").0, 200);
    let (st, models) = get(&s.base, "/v1/models");
    assert_eq!(st, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // The served models, then the default route group over them, then the embedding models (the
    // second is the first with the question-matching adapter, the semantic cache's).
    assert_eq!(
        ids,
        [
            "smollm2-135m-instruct",
            "gemma-3-270m",
            "auto",
            "all-minilm-l6-v2",
            "all-minilm-l6-v2-questions"
        ]
    );
    assert_eq!(models["data"][3]["capabilities"], json!(["embeddings"]));
    assert_eq!(models["data"][4]["capabilities"], json!(["embeddings"]));
    assert_eq!(
        models["data"][2]["capabilities"],
        json!(["chat.completions", "completions"])
    );
    for model in &ids[..3] {
        let (st, v, _) = post(
            &s.base,
            "/v1/completions",
            &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}).to_string(),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    }
    let (st, body) = get(&s.base, "/nope");
    assert_eq!(st, 404);
    assert_error(&body, Some("not_found"));
}

#[test]
fn chat_matches_the_engine_and_streaming_matches_non_streaming() {
    let s = TestServer::smol(|_| {});
    let req = json!({
        "model": "smol",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}],
        "max_tokens": 12, "temperature": 0, "unknown_field": {"ignored": true}
    });
    let (st, v, _) = post(&s.base, "/v1/chat/completions", &req.to_string());
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");

    // The same prompt through the engine directly gives the same text.
    let e = common::engine(&common::smollm2(), Default::default());
    let prompt = e
        .tokenizer
        .encode(
            &e.chat_template
                .render(&[
                    hearth::model::ChatMessage::new("system", "Be brief."),
                    hearth::model::ChatMessage::new("user", "Name a color."),
                ])
                .unwrap(),
        )
        .unwrap();
    let toks = common::greedy(&e, &prompt, 12);
    let direct = e.tokenizer.decode(&toks).unwrap();
    assert_eq!(text, direct);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let events = sse(&s.base, "/v1/chat/completions", &sreq);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);
    assert_eq!(usage["total_tokens"], v["usage"]["total_tokens"]);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| &ch["finish_reason"]))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&v["choices"][0]["finish_reason"]]);
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = TestServer::smol(|c| c.max_body_bytes = 4096);
    let cases = [
        (json!({"model": "smol", "messages": "hi"}).to_string(), 400, None),
        (json!({"model": "smol", "prompt": "x", "max_tokens": "ten"}).to_string(), 400, None),
        ("{not json".to_string(), 400, None),
        (json!({"model": "smol", "messages": []}).to_string(), 400, None),
        (json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(), 400, None),
        (json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "temperature": -1}).to_string(), 400, None),
        (json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, Some("model_not_found")),
        (json!({"model": "smol", "prompt": "x".repeat(5000)}).to_string(), 413, Some("request_too_large")),
        // The `user` label goes to the usage ledger: bounded, and no control characters.
        (json!({"model": "smol", "prompt": "x", "user": "a\u{0}b"}).to_string(), 400, None),
        (json!({"model": "smol", "messages": [{"role": "user", "content": "x"}], "user": "u".repeat(513)}).to_string(), 400, None),
    ];
    for (body, status, code) in cases {
        let (st, v, _) = post(
            &s.base,
            if body.contains("prompt") {
                "/v1/completions"
            } else {
                "/v1/chat/completions"
            },
            &body,
        );
        assert_eq!(st, status, "{body:.80}: {v}");
        assert_error(&v, code);
    }
    // A prompt over the context: 400, and the message gives both numbers.
    let s = TestServer::smol(|_| {});
    let long = "word ".repeat(9000);
    let (st, v, _) = post(
        &s.base,
        "/v1/completions",
        &json!({"model": "smol", "prompt": long, "max_tokens": 4}).to_string(),
    );
    assert_eq!(st, 400);
    assert_error(&v, Some("context_length_exceeded"));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("8192"), "{msg}");
    assert!(
        msg.chars().filter(|c| c.is_ascii_digit()).count() >= 8,
        "{msg}"
    );
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = TestServer::smol(|c| {
        c.max_waiting = 1;
        c.max_seqs = 1;
    });
    // Fill the one running slot and the one waiting slot with long requests, then one more.
    let long = json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = agent()
            .post(&format!("{}/v1/completions", s.base))
            .header("content-type", "application/json")
            .send(long.to_string())
            .unwrap();
        held.push(r);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut saw_429 = false;
    for _ in 0..20 {
        let (st, v, retry) = post(
            &s.base,
            "/v1/completions",
            &json!({"model": "smol", "prompt": "hi", "max_tokens": 2}).to_string(),
        );
        if st == 429 {
            assert_error(&v, Some("queue_full"));
            assert_eq!(retry.as_deref(), Some("1"));
            saw_429 = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(saw_429, "the queue never filled");
    drop(held);
}

#[test]
fn a_client_dropped_mid_stream_frees_its_blocks() {
    let s = TestServer::named("smol-drop", |_| {});
    let free = r#"hearth_kv_cache_free_blocks{model="smol-drop"}"#;
    let total = s
        .metric(r#"hearth_kv_cache_total_blocks{model="smol-drop"}"#)
        .unwrap();
    let mut r = agent()
        .post(&format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .send(json!({"model": "smol-drop", "prompt": "Tell me a long story about a dragon.", "max_tokens": 2000, "temperature": 0, "ignore_eos": true, "stream": true}).to_string())
        .unwrap();
    let mut lines = BufReader::new(r.body_mut().as_reader()).lines();
    for _ in 0..6 {
        lines.next();
    }
    assert!(
        s.metric(free).unwrap() < total,
        "the request holds blocks while streaming"
    );
    drop(lines);
    drop(r);
    let t0 = Instant::now();
    // Blocks come back (as free or cached) once the engine sees the closed channel.
    while s.metric(free).unwrap() < total {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "blocks were not freed after disconnect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        s.metric(r#"hearth_num_requests_running{model="smol-drop"}"#),
        Some(0.0)
    );
}

#[test]
fn metrics_cover_latency_tokens_and_cache() {
    let s = TestServer::named("smol-metrics", |_| {});
    let body = json!({"model": "smol-metrics", "prompt": "The same long shared prefix for caching, repeated twice. ".repeat(4), "max_tokens": 3, "temperature": 0}).to_string();
    for _ in 0..2 {
        assert_eq!(post(&s.base, "/v1/completions", &body).0, 200);
    }
    let (_, v, _) = post(&s.base, "/v1/completions", &body);
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 32,
        "{v}"
    );
    let text = ureq::get(&format!("{}/metrics", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    for name in [
        "hearth_time_to_first_token_seconds_bucket",
        "hearth_inter_token_latency_seconds_bucket",
        "hearth_e2e_request_latency_seconds_bucket",
        "hearth_request_queue_time_seconds_bucket",
        "hearth_prompt_tokens_total",
        "hearth_generation_tokens_total",
        "hearth_kv_cache_usage_perc",
        "hearth_prefix_cache_queries_total",
        "hearth_prefix_cache_hits_total",
        "hearth_num_preemptions_total",
        "hearth_num_requests_running",
        "hearth_num_requests_waiting",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains(r#"model="smol-metrics""#)),
            "missing {name}"
        );
    }
    assert!(
        s.metric(r#"hearth_prefix_cache_hits_total{model="smol-metrics"}"#)
            .unwrap()
            >= 64.0
    );
    assert!(
        s.metric(r#"hearth_generation_tokens_total{model="smol-metrics"}"#)
            .unwrap()
            >= 9.0
    );
}

#[test]
fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let mut s = TestServer::smol(|_| {});
    let base = s.base.clone();
    let inflight = std::thread::spawn(move || {
        post(&base, "/v1/completions", &json!({"model": "smol", "prompt": "Count:", "max_tokens": 60, "temperature": 0, "ignore_eos": true}).to_string())
    });
    std::thread::sleep(Duration::from_millis(400));
    let server = s.server.take().unwrap();
    let state = server.state.clone();
    let done = s.rt.spawn(server.shutdown(Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(50));
    assert!(state
        .shutting_down
        .load(std::sync::atomic::Ordering::Relaxed));
    let (st, v, _) = inflight.join().unwrap();
    assert_eq!(st, 200, "the in-flight request finishes: {v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    s.rt.block_on(done).unwrap();
    // After the drain the listener is gone.
    assert!(agent().get(&format!("{}/health", s.base)).call().is_err());
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ledger =
        std::env::temp_dir().join(format!("hearth-sigterm-{}.sqlite3", std::process::id()));
    let _ = std::fs::remove_file(&ledger);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--port", &port.to_string(), "--model"])
        .arg(format!("smol={}", common::smollm2().display()))
        .arg("--ledger")
        .arg(&ledger)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while agent()
        .get(&format!("{base}/ready"))
        .call()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not get ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let inflight: Vec<_> = (0..4)
        .map(|i| {
            let b = base.clone();
            std::thread::spawn(move || {
                post(&b, "/v1/completions", &json!({"model": "smol", "prompt": format!("Count {i}:"), "max_tokens": 40, "temperature": 0, "ignore_eos": true}).to_string())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for h in inflight {
        let (st, v, _) = h.join().unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 40);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Every request drained by SIGTERM is in the usage ledger.
    let totals = hearth::ledger::sqlite::query(&ledger, &Default::default()).unwrap();
    assert_eq!(totals[0].requests, 4, "{totals:?}");
    assert_eq!(totals[0].completion_tokens, 160);
    let _ = std::fs::remove_file(&ledger);
}
