//! Request traces over OTLP, received by a real receiver (tests/python/otlp_receiver.py, which
//! decodes the protobuf with the official `opentelemetry-proto` package): http/protobuf and gRPC,
//! the client's `traceparent`, the spans of a request's path (validate, cache lookup, tokenize or
//! route, queue, prefill chunks, decode, escalate) with their times nested in the request's, the
//! GenAI attributes equal to what the response reported, sampling, and no prompt or output text
//! unless `otlp_export_content` is on.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const KEY: &str = "trace-key-1";
const TENANT: &str = "tracing-team";

/// The receiver process, killed on drop, and the file its spans go to.
struct Receiver {
    child: Child,
    out: PathBuf,
    http: u16,
    grpc: u16,
}

impl Receiver {
    fn start(tag: &str) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".venv-test/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/test.sh, which installs opentelemetry-proto and grpcio",
            python.display()
        );
        let out =
            std::env::temp_dir().join(format!("hearth-otlp-{}-{tag}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let mut child = Command::new(python)
            .arg(root.join("tests/python/otlp_receiver.py"))
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the receiver starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Vec<u16> = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("receiver said {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        Self {
            child,
            out,
            http: ports[0],
            grpc: ports[1],
        }
    }

    /// Every span received, once at least `n` have arrived (or after 30 s).
    fn spans(&self, n: usize) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let spans = read_spans(&self.out);
            if spans.len() >= n || t0.elapsed() > Duration::from_secs(30) {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

fn read_spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// POST `body` with the tenant's key and extra headers: status, `x-request-id`, body text.
fn send(base: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, String, String) {
    let mut rq = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("authorization", &format!("Bearer {KEY}"));
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    let mut r = rq.send(body.to_string()).expect("request sent");
    let id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut text = String::new();
    r.body_mut().as_reader().read_to_string(&mut text).unwrap();
    (r.status().as_u16(), id, text)
}

/// The request span of `request_id` and the spans under it (directly or through an escalation).
fn request_spans(all: &[Value], request_id: &str) -> (Value, Vec<Value>) {
    let root = all
        .iter()
        .find(|s| s["attributes"]["hearth.request_id"] == request_id)
        .unwrap_or_else(|| panic!("no request span for {request_id}: {all:#?}"))
        .clone();
    let trace = root["trace_id"].as_str().unwrap();
    let under: Vec<Value> = all
        .iter()
        .filter(|s| s["trace_id"] == trace && s["span_id"] != root["span_id"])
        .cloned()
        .collect();
    (root, under)
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn ns(s: &Value, k: &str) -> u64 {
    s[k].as_u64().unwrap()
}

/// `inner` lies within `outer` in time.
fn within(inner: &Value, outer: &Value) {
    assert!(
        ns(inner, "start_ns") >= ns(outer, "start_ns")
            && ns(inner, "end_ns") <= ns(outer, "end_ns"),
        "{} [{}, {}] outside {} [{}, {}]",
        inner["name"],
        inner["start_ns"],
        inner["end_ns"],
        outer["name"],
        outer["start_ns"],
        outer["end_ns"]
    );
}

fn server(receiver: &Receiver, f: impl FnOnce(&mut hearth::config::Config)) -> TestServer {
    let mut cfg = hearth::config::Config {
        models: common::both_models("otlp-small", "otlp-large"),
        embedding_models: vec![hearth::config::EmbeddingModelEntry {
            name: "otlp-minilm".into(),
            path: common::models_dir().join("all-minilm-l6-v2"),
            adapter: None,
        }],
        tenants: vec![TenantConfig::new(TENANT, &[KEY])],
        // Small steps: a prompt of a few hundred tokens prefills in several chunks.
        max_batch_tokens: 64,
        otlp_endpoint: Some(format!("http://127.0.0.1:{}", receiver.http)),
        routes: vec![common::always_escalates(
            "otlp-escalate",
            "otlp-small",
            "otlp-large",
        )],
        ..Default::default()
    };
    f(&mut cfg);
    TestServer::start(cfg)
}

/// Stop the server: its exporter sends what it still holds.
fn stop(mut s: TestServer) {
    let server = s.server.take().unwrap();
    s.rt.block_on(server.shutdown(Duration::from_secs(5)));
}

#[test]
fn http_protobuf_traces_follow_the_request_path_under_the_clients_traceparent() {
    let receiver = Receiver::start("http");
    let s = server(&receiver, |_| {});
    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let secret = "the committee reviewed the quarterly figures for the northern depot";
    let prompt = format!("{secret}. ").repeat(12);
    let (status, chat_id, text) = send(
        &s.base,
        "/v1/chat/completions",
        &[("traceparent", traceparent.as_str())],
        &json!({"model": "otlp-small", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 6, "temperature": 0, "user": "analyst-7", "stop": ["the end"]}),
    );
    assert_eq!(status, 200, "{text}");
    let chat: Value = serde_json::from_str(&text).unwrap();

    // A routed stream that escalates: the large model's spans go under `escalate`.
    let (status, routed_id, text) = send(
        &s.base,
        "/v1/completions",
        &[],
        &json!({"model": "otlp-escalate", "prompt": "The capital of France is", "max_tokens": 5,
                "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(status, 200, "{text}");
    let usage_chunk: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");

    // Refused in validation: a 400, traced, not a server error.
    let (status, bad_id, _) = send(
        &s.base,
        "/v1/chat/completions",
        &[],
        &json!({"model": "otlp-small", "messages": [{"role": "user", "content": "hi"}], "n": 0}),
    );
    assert_eq!(status, 400);

    let (status, embed_id, text) = send(
        &s.base,
        "/v1/embeddings",
        &[],
        &json!({"model": "otlp-minilm", "input": ["first text", "second text"]}),
    );
    assert_eq!(status, 200, "{text}");
    let embedded: Value = serde_json::from_str(&text).unwrap();

    stop(s);
    let all = receiver.spans(20);
    assert!(all.iter().all(|s| s["protocol"] == "http/protobuf"));
    assert!(all
        .iter()
        .all(|s| s["resource"]["service.name"] == "hearth"));
    // Content is off: the prompt's words and the reply are nowhere in the export.
    let dump = serde_json::to_string(&all).unwrap();
    assert!(!dump.contains("northern depot"), "the prompt was exported");
    assert!(
        !dump.contains("analyst-7") && !dump.contains("the end"),
        "the user label or a stop string was exported"
    );
    assert!(!dump.contains("gen_ai.input.messages") && !dump.contains("gen_ai.output.messages"));

    // The chat request: under the client's span, named and attributed per the GenAI conventions.
    let (root, under) = request_spans(&all, &chat_id);
    assert_eq!(root["trace_id"], trace_id);
    assert_eq!(root["parent_span_id"], client_span);
    assert_eq!(root["name"], "chat otlp-small");
    assert_eq!(root["kind"], 2, "a server span");
    assert_eq!(root["status_code"], 0, "{root}");
    let a = &root["attributes"];
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.request.model"], "otlp-small");
    assert_eq!(a["gen_ai.response.model"], "otlp-small");
    assert_eq!(a["gen_ai.request.max_tokens"], 6);
    assert_eq!(
        a["gen_ai.usage.input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        a["gen_ai.usage.output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert_eq!(
        a["gen_ai.usage.cache_read.input_tokens"],
        chat["usage"]["prompt_tokens_details"]["cached_tokens"]
    );
    assert_eq!(
        a["gen_ai.response.finish_reasons"],
        json!([chat["choices"][0]["finish_reason"]])
    );
    assert_eq!(a["hearth.tenant"], TENANT);
    // The end-user label goes only with the content.
    assert!(a["hearth.user"].is_null());
    assert_eq!(a["http.response.status_code"], 200);
    let device = chat["metrics"]["device_time_ms"].as_f64().unwrap();
    assert!(device > 0.0);
    assert!((a["hearth.device_time_ms"].as_f64().unwrap() - device).abs() < 1e-6 * device.max(1.0));
    assert!(a["hearth.quality.mean_logprob"].as_f64().unwrap() <= 0.0);
    for s in &under {
        assert_eq!(s["parent_span_id"], root["span_id"], "{s}");
        assert_eq!(s["kind"], 1, "internal: {s}");
        within(s, &root);
    }
    let one = |name: &str| {
        let v = named(&under, name);
        assert_eq!(v.len(), 1, "{name}: {under:#?}");
        v[0].clone()
    };
    let (validate, tokenize, queue, decode) = (
        one("validate"),
        one("tokenize"),
        one("queue"),
        one("decode"),
    );
    assert!(named(&under, "route").is_empty() && named(&under, "escalate").is_empty());
    assert!(ns(&validate, "end_ns") <= ns(&tokenize, "start_ns"));
    assert!(ns(&tokenize, "end_ns") <= ns(&queue, "start_ns"));
    // The prompt (over 64 tokens) ran in several chunks, in order, after the queue; their tokens
    // add up to the prompt's uncached part; decoding began at the first token, after them.
    let mut chunks = named(&under, "prefill");
    chunks.sort_by_key(|s| s["attributes"]["hearth.prefill.chunk"].as_u64());
    assert!(chunks.len() >= 3, "{chunks:#?}");
    let prompt_tokens = chat["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = chat["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let ran: u64 = chunks
        .iter()
        .map(|c| c["attributes"]["hearth.prefill.tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(ran, prompt_tokens - cached);
    let mut at = ns(&queue, "end_ns");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["attributes"]["hearth.prefill.chunk"], i as u64 + 1);
        assert!(c["attributes"]["hearth.step.tokens"].as_u64().unwrap() <= 64);
        assert!(
            ns(c, "start_ns") + 1_000_000 >= at,
            "chunk {i} overlaps what came before"
        );
        at = ns(c, "end_ns");
    }
    assert!(ns(&decode, "start_ns") + 1_000_000 >= at);
    assert_eq!(
        decode["attributes"]["gen_ai.usage.output_tokens"],
        chat["usage"]["completion_tokens"]
    );

    // The routed stream: a fresh trace (no traceparent); the small model's attempt under the
    // request, the large one's under `escalate`.
    let (root, under) = request_spans(&all, &routed_id);
    assert_eq!(root["parent_span_id"], "");
    assert_ne!(root["trace_id"], trace_id);
    assert_eq!(root["name"], "text_completion otlp-escalate");
    let a = &root["attributes"];
    assert_eq!(a["gen_ai.response.model"], "otlp-large");
    assert_eq!(a["hearth.route.group"], "otlp-escalate");
    assert_eq!(a["hearth.route.escalated"], true);
    assert_eq!(a["hearth.route.tried"], json!(["otlp-small", "otlp-large"]));
    assert_eq!(a["hearth.stream"], true);
    assert_eq!(
        a["gen_ai.usage.output_tokens"],
        usage_chunk["usage"]["completion_tokens"]
    );
    let route = named(&under, "route");
    assert_eq!(route.len(), 1);
    let escalate = named(&under, "escalate");
    assert_eq!(escalate.len(), 1, "{under:#?}");
    let escalate = escalate[0];
    assert_eq!(escalate["parent_span_id"], root["span_id"]);
    assert_eq!(escalate["attributes"]["hearth.route.from"], "otlp-small");
    assert_eq!(escalate["attributes"]["hearth.route.to"], "otlp-large");
    within(escalate, &root);
    for s in &under {
        match s["attributes"]["gen_ai.response.model"].as_str() {
            Some("otlp-large") if s["name"] != "route" => {
                assert_eq!(s["parent_span_id"], escalate["span_id"], "{s}");
                within(s, escalate);
            }
            _ => assert_eq!(s["parent_span_id"], root["span_id"], "{s}"),
        }
    }
    for model in ["otlp-small", "otlp-large"] {
        for name in ["queue", "prefill", "decode"] {
            assert!(
                under.iter().any(
                    |s| s["name"] == name && s["attributes"]["gen_ai.response.model"] == model
                ),
                "no {name} span of {model}: {under:#?}"
            );
        }
    }

    // The refusal: validated, refused, the error type its status; not a fault.
    let (root, under) = request_spans(&all, &bad_id);
    assert_eq!(root["attributes"]["error.type"], "400");
    assert_eq!(root["attributes"]["http.response.status_code"], 400);
    assert_eq!(root["status_code"], 0);
    assert_eq!(named(&under, "validate").len(), 1);
    assert!(named(&under, "queue").is_empty());

    // Embeddings: queued, then one forward.
    let (root, under) = request_spans(&all, &embed_id);
    assert_eq!(root["name"], "embeddings otlp-minilm");
    assert_eq!(root["attributes"]["gen_ai.operation.name"], "embeddings");
    assert_eq!(
        root["attributes"]["gen_ai.usage.input_tokens"],
        embedded["usage"]["prompt_tokens"]
    );
    for name in ["validate", "queue", "embed"] {
        assert_eq!(named(&under, name).len(), 1, "{name}: {under:#?}");
    }
}

#[test]
fn bad_trace_settings_are_refused_at_start() {
    for (endpoint, ratio) in [
        ("https://collector:4318", 1.0),
        ("collector:4318", 1.0),
        ("http://collector:4318", 1.5),
        ("http://collector:4318", f64::NAN),
    ] {
        let cfg = hearth::config::Config {
            otlp_endpoint: Some(endpoint.into()),
            otlp_sample_ratio: ratio,
            ..Default::default()
        };
        assert!(cfg.traces().is_err(), "{endpoint} {ratio}");
    }
    let off = hearth::config::Config::default();
    assert!(off.traces().unwrap().is_none());
}

#[test]
fn grpc_traces_sample_by_the_clients_flag_and_carry_content_only_when_configured() {
    let receiver = Receiver::start("grpc");
    let s = server(&receiver, |c| {
        c.otlp_endpoint = Some(format!("http://127.0.0.1:{}", receiver.grpc));
        c.otlp_protocol = hearth::telemetry::trace::OtlpProtocol::Grpc;
        c.otlp_export_content = true;
        // No trace of its own is kept: only those a client's sampled traceparent asks for.
        c.otlp_sample_ratio = 0.0;
        c.cache.exact = true;
    });
    let ask = |traceparent: Option<&str>| {
        let headers: Vec<(&str, &str)> = traceparent
            .map(|t| ("traceparent", t))
            .into_iter()
            .collect();
        let (status, id, text) = send(
            &s.base,
            "/v1/chat/completions",
            &headers,
            &json!({"model": "otlp-small", "messages": [
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Name a colour of the sky."}],
                "max_tokens": 5, "temperature": 0, "user": "analyst-9", "stop": ["\n\n"]}),
        );
        assert_eq!(status, 200, "{text}");
        (id, serde_json::from_str::<Value>(&text).unwrap())
    };
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (first, answer) = ask(Some(sampled));
    let (unsampled, _) = ask(None);
    let (declined, _) = ask(Some(
        "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00",
    ));
    let (hit, _) = ask(Some(
        "00-2af7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01",
    ));
    stop(s);
    let all = receiver.spans(8);
    assert!(all.iter().all(|s| s["protocol"] == "grpc"));
    let ids: Vec<&str> = all
        .iter()
        .filter_map(|s| s["attributes"]["hearth.request_id"].as_str())
        .collect();
    assert!(ids.contains(&first.as_str()) && ids.contains(&hit.as_str()));
    assert!(
        !ids.contains(&unsampled.as_str()) && !ids.contains(&declined.as_str()),
        "ratio 0 keeps no trace of its own, and a client's unsampled flag is obeyed: {ids:?}"
    );

    let (root, under) = request_spans(&all, &first);
    assert_eq!(root["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    let a = &root["attributes"];
    assert_eq!(a["hearth.user"], "analyst-9");
    assert_eq!(a["gen_ai.request.stop_sequences"], json!(["\n\n"]));
    let input: Value = serde_json::from_str(a["gen_ai.input.messages"].as_str().unwrap()).unwrap();
    assert_eq!(
        input,
        json!([
            {"role": "system", "parts": [{"type": "text", "content": "You answer in one word."}]},
            {"role": "user", "parts": [{"type": "text", "content": "Name a colour of the sky."}]}
        ])
    );
    let output: Value =
        serde_json::from_str(a["gen_ai.output.messages"].as_str().unwrap()).unwrap();
    assert_eq!(
        output[0]["parts"][0]["content"],
        answer["choices"][0]["message"]["content"]
    );
    assert_eq!(output[0]["role"], "assistant");
    let lookup = named(&under, "cache lookup");
    assert_eq!(lookup.len(), 1);
    assert_eq!(lookup[0]["attributes"]["hearth.cache.result"], "miss");

    // The same question again: answered from the response cache, nothing queued or decoded.
    let (root, under) = request_spans(&all, &hit);
    assert_eq!(root["attributes"]["hearth.cache.hit"], "exact");
    assert_eq!(
        named(&under, "cache lookup")[0]["attributes"]["hearth.cache.result"],
        "hit"
    );
    assert!(named(&under, "queue").is_empty() && named(&under, "decode").is_empty());
    let output: Value = serde_json::from_str(
        root["attributes"]["gen_ai.output.messages"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        output[0]["parts"][0]["content"],
        answer["choices"][0]["message"]["content"]
    );
}
