//! What tracing a request costs, measured directly (cargo bench --bench trace_cost): a request's
//! usual spans (validate, tokenize, queue, one prefill chunk, decode) and attributes recorded,
//! then handed to the SDK and exported over OTLP/HTTP to a local sink that discards the batches.
//! Reported per request: the time on the request's own path (recording and ending the trace) and
//! the process CPU in all (the batch thread's protobuf encoding and HTTP included). Against a
//! request's serving cost this bounds the overhead far below what an end-to-end A/B resolves on a
//! noisy machine (see benches/RESULTS.md).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use hearth::telemetry::trace::{OtlpProtocol, TraceConfig, Tracing};
use opentelemetry::KeyValue;

/// An OTLP/HTTP endpoint that reads each request and answers 200 with an empty body.
fn sink() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.to_ascii_lowercase();
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if w.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid rusage to write.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() {
    let tracing = Tracing::start(&TraceConfig {
        endpoint: format!("http://127.0.0.1:{}", sink()),
        protocol: OtlpProtocol::HttpProtobuf,
        content: false,
        sample_ratio: 1.0,
    })
    .unwrap();
    let headers = axum::http::HeaderMap::new();
    let kv = |k: &'static str, v: i64| KeyValue::new(k, v);
    let run = |requests: usize| -> (Duration, f64) {
        let cpu0 = cpu_seconds();
        let mut on_path = Duration::ZERO;
        // In batches the processor's queue (2048 spans) holds, flushed between them.
        for _ in 0..requests / 200 {
            let t0 = Instant::now();
            for i in 0..200 {
                let t = Instant::now();
                let trace = tracing.begin(&headers, t);
                trace.name(|| "chat smollm2-135m-instruct".to_string());
                trace.set(|| {
                    vec![
                        KeyValue::new("gen_ai.operation.name", "chat"),
                        KeyValue::new("gen_ai.provider.name", "hearth"),
                        KeyValue::new("gen_ai.request.model", "smollm2-135m-instruct"),
                        KeyValue::new("gen_ai.request.temperature", 0.0),
                        KeyValue::new("gen_ai.request.top_p", 1.0),
                        kv("gen_ai.request.max_tokens", 32),
                        KeyValue::new("hearth.stream", true),
                    ]
                });
                trace.span("validate", None, t, Instant::now(), Vec::new);
                trace.span("tokenize", None, t, Instant::now(), || {
                    vec![kv("gen_ai.usage.input_tokens", 20)]
                });
                let model = || KeyValue::new("gen_ai.response.model", "smollm2-135m-instruct");
                trace.span("queue", None, t, Instant::now(), || {
                    vec![
                        model(),
                        kv("hearth.choice", 0),
                        kv("gen_ai.usage.cache_read.input_tokens", 0),
                    ]
                });
                trace.span("prefill", None, t, Instant::now(), || {
                    vec![
                        model(),
                        kv("hearth.choice", 0),
                        kv("hearth.prefill.chunk", 1),
                        kv("hearth.prefill.tokens", 20),
                        kv("hearth.step.tokens", 512),
                    ]
                });
                trace.span("decode", None, t, Instant::now(), || {
                    vec![
                        model(),
                        kv("hearth.choice", 0),
                        kv("gen_ai.usage.output_tokens", 32),
                        KeyValue::new("hearth.decode_device_time_ms", 40.0),
                        KeyValue::new("hearth.finish", "length"),
                    ]
                });
                let row = hearth::ledger::Row {
                    request_id: format!("req-{i}"),
                    tenant: "default".into(),
                    model: "smollm2-135m-instruct".into(),
                    prompt_tokens: 20,
                    completion_tokens: 32,
                    finish_reason: "length".into(),
                    status: 200,
                    ttft_ms: Some(100.0),
                    quality: Some(hearth::quality::Quality {
                        tokens: 32,
                        mean_logprob: -0.5,
                        p10_logprob: -2.0,
                        min_logprob: -4.0,
                        mean_entropy: 1.0,
                        mean_margin: Some(2.0),
                        repetition: 0.0,
                        stopped_on_length: true,
                    }),
                    ..Default::default()
                };
                hearth::server::genai::ended(&trace, &row, None);
            }
            on_path += t0.elapsed();
            tracing.flush();
        }
        (on_path, cpu_seconds() - cpu0)
    };
    run(1000); // warm-up: the exporter's client and connection
    let requests = 20_000;
    let (on_path, cpu) = run(requests);
    println!(
        "per traced request: {:.1} us on its own path (recording, ending), {:.1} us of process CPU \
         in all (with the batch thread's encoding and export)",
        on_path.as_secs_f64() / requests as f64 * 1e6,
        cpu / requests as f64 * 1e6
    );
    tracing.shutdown();
}
