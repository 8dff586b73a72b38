//! Device-time metering over real HTTP on SmolLM2: each response's `metrics.device_time_ms` is its
//! share of the steps it ran in, and the shares of concurrent requests add up to the engine's
//! measured device time and to the per-tenant counters (conservation).
mod common;

use common::{agent, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};

fn tenant(name: &str, key: &str) -> TenantConfig {
    TenantConfig::new(name, &[key])
}

/// The response's `metrics` object (from the JSON body, or from the usage chunk of a stream) and,
/// for JSON, the `x-hearth-device-time-ms` header.
fn request(base: &str, key: &str, body: &Value) -> (Value, Option<f64>) {
    let mut r = agent()
        .post(&format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .header("authorization", &format!("Bearer {key}"))
        .send(body.to_string())
        .expect("request sent");
    assert_eq!(r.status().as_u16(), 200);
    let header = r
        .headers()
        .get("x-hearth-device-time-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if body["stream"] == json!(true) {
        let last_usage = BufReader::new(r.body_mut().as_reader())
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .filter(|d| d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(&d).ok())
            .filter(|v| v.get("usage").is_some_and(|u| !u.is_null()))
            .last()
            .expect("a usage chunk");
        (last_usage["metrics"].clone(), header)
    } else {
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (v["metrics"].clone(), header)
    }
}

#[test]
fn concurrent_shares_add_up_to_the_engines_device_time() {
    let s = TestServer::named("meter", |c| {
        c.tenants = vec![tenant("team-a", "sk-a"), tenant("team-b", "sk-b")];
        c.max_batch_tokens = 64;
    });
    let engine = "hearth_engine_device_seconds_total{model=\"meter\"}";
    let per_tenant =
        |t: &str| format!("hearth_tenant_device_seconds_total{{tenant=\"{t}\",model=\"meter\"}}");
    let read = |name: &str| s.metric(name).unwrap_or(0.0);
    let (e0, a0, b0) = (
        read(engine),
        read(&per_tenant("team-a")),
        read(&per_tenant("team-b")),
    );
    // Eight requests at once: short and long prompts (the long ones take several 64-token prefill
    // chunks that share steps with the others' decoding), streaming and not, two tenants; the long
    // ones end on a stop string (which the text layer, not the engine, sees first).
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let base = s.base.clone();
            std::thread::spawn(move || {
                let prompt = if i % 2 == 0 {
                    "Tell me a story about a lighthouse keeper.".to_string()
                } else {
                    "The committee reviewed the quarterly figures in detail. ".repeat(12)
                };
                let mut body = json!({
                    "model": "meter", "prompt": prompt, "max_tokens": 4 + 6 * i,
                    "stream": i % 3 == 0, "stream_options": {"include_usage": true},
                });
                if i % 2 == 1 {
                    body["stop"] = json!([" "]);
                }
                let key = if i % 4 == 3 { "sk-b" } else { "sk-a" };
                (
                    key,
                    request(&base, key, &body),
                    body["stream"] == json!(true),
                )
            })
        })
        .collect();
    let mut sums = std::collections::HashMap::<&str, f64>::new();
    for h in handles {
        let (key, (m, header), streamed) = h.join().unwrap();
        let device = m["device_time_ms"].as_f64().expect("device_time_ms");
        assert!(device > 0.0, "{m}");
        let parts = m["prefill_device_time_ms"].as_f64().unwrap()
            + m["decode_device_time_ms"].as_f64().unwrap();
        assert!(
            (parts - device).abs() < 1e-3,
            "prefill + decode = total: {m}"
        );
        assert!(
            m["time_to_first_token_ms"].as_f64().unwrap() >= m["queue_time_ms"].as_f64().unwrap(),
            "{m}"
        );
        assert!(m["tokens_per_second"].as_f64().unwrap() > 0.0, "{m}");
        if !streamed {
            let h = header.expect("x-hearth-device-time-ms on JSON responses");
            assert!((h - device).abs() < 1e-3, "header {h} vs body {device}");
        }
        *sums.entry(key).or_default() += device / 1e3;
    }
    let (e1, a1, b1) = (
        read(engine),
        read(&per_tenant("team-a")),
        read(&per_tenant("team-b")),
    );
    let total: f64 = sums.values().sum();
    let close = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= 0.01 * want,
            "{what}: responses sum to {want:.6} s, counter moved {got:.6} s"
        );
    };
    close(e1 - e0, total, "engine");
    close(a1 - a0, sums["sk-a"], "team-a");
    close(b1 - b0, sums["sk-b"], "team-b");
}
