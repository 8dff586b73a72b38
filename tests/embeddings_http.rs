//! `/v1/embeddings` over real HTTP with tenants: each request is metered (device time split over
//! the tenants exactly), written to the usage ledger under its own tenant only, and held to the
//! tenant's token limit. (Parity and the client's view are in tests/embedding.rs and the official
//! client's tests.)
mod common;

use common::TestServer;
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const MODEL: &str = "all-minilm-l6-v2";

fn embed(base: &str, key: &str, input: Value) -> (u16, Value) {
    let body = json!({"model": MODEL, "input": input, "user": "carol"});
    let (status, v, _) = common::call(base, "POST", "/v1/embeddings", Some(key), Some(&body));
    (status, v)
}

#[test]
fn embeddings_are_metered_billed_and_limited_per_tenant() {
    let dir = std::env::temp_dir().join(format!("hearth-embed-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = TestServer::named("embed-http", |c| {
        c.admin_api_keys = vec!["sk-admin".into()];
        let mut tight = TenantConfig::new("team-tight", &["sk-t"]);
        tight.tokens_per_minute = Some(20);
        c.tenants = vec![
            TenantConfig::new("team-a", &["sk-a"]),
            TenantConfig::new("team-b", &["sk-b"]),
            tight,
        ];
        c.ledger_path = Some(dir.join("usage.sqlite3"));
    });
    let (status, a) = embed(
        &s.base,
        "sk-a",
        json!([
            "How do I reset my VPN password?",
            "The office opens at nine."
        ]),
    );
    assert_eq!(status, 200, "{a}");
    let (status, b) = embed(
        &s.base,
        "sk-b",
        json!("Quarterly revenue grew by 12 percent."),
    );
    assert_eq!(status, 200, "{b}");
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    let device = |v: &Value| v["metrics"]["device_time_ms"].as_f64().unwrap();
    assert_eq!(a["data"].as_array().unwrap().len(), 2);
    assert!(tokens(&a) > tokens(&b) && tokens(&b) > 0);
    assert!(device(&a) > 0.0 && device(&b) > 0.0);

    // The ledger: one row per request under its own tenant, with its tokens and device time.
    let usage = |key: &str| {
        let (status, v, _) = common::call(
            &s.base,
            "GET",
            "/v1/usage?group_by=tenant,model,user",
            Some(key),
            None,
        );
        assert_eq!(status, 200, "{v}");
        v["data"].as_array().unwrap().clone()
    };
    let mine = usage("sk-a");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0]["tenant"], "team-a");
    assert_eq!(mine[0]["model"], MODEL);
    assert_eq!(mine[0]["user"], "carol");
    assert_eq!(mine[0]["requests"], 1);
    assert_eq!(mine[0]["prompt_tokens"].as_u64(), Some(tokens(&a)));
    assert_eq!(mine[0]["completion_tokens"], 0);
    assert!((mine[0]["device_time_ms"].as_f64().unwrap() - device(&a)).abs() < 1e-3);
    assert_eq!(usage("sk-admin").len(), 2);

    // Device time: the model's total is split over the tenants, exactly.
    let model = s
        .metric(&format!(
            "hearth_engine_device_seconds_total{{model=\"{MODEL}\"}}"
        ))
        .unwrap();
    let tenant = |t: &str| {
        s.metric(&format!(
            "hearth_tenant_device_seconds_total{{tenant=\"{t}\",model=\"{MODEL}\"}}"
        ))
        .unwrap_or(0.0)
    };
    assert!(model > 0.0);
    assert!(
        (tenant("team-a") + tenant("team-b") - model).abs() < 1e-9 * 4.0,
        "{model}"
    );
    assert!((tenant("team-a") * 1e3 - device(&a)).abs() < 1e-3);

    // 20 tokens a minute: the first request may take the bucket into debt, the next is refused.
    let (status, v) = embed(&s.base, "sk-t", json!("a sentence of a few more than twenty tokens, long enough to overdraw the bucket at once"));
    assert_eq!(status, 200, "{v}");
    let (status, v) = embed(&s.base, "sk-t", json!("again"));
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tokens_per_minute"));
    let _ = std::fs::remove_dir_all(&dir);
}
