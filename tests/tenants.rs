//! Tenants and API keys over real HTTP on SmolLM2: who may call and as whom, prefix-cache isolation
//! by key (never by the `user` field), open probes, and live key rotation by SIGHUP.
mod common;

use common::{agent, call, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn tenant(name: &str, keys: &[&str]) -> TenantConfig {
    TenantConfig::new(name, keys)
}

/// Team A by its key, team B by the SHA-256 of its key only, and one admin key.
fn keyed(name: &str, metrics_require_key: bool) -> TestServer {
    let b_digest = format!("sha256:{}", hex::encode(Sha256::digest(b"sk-team-b")));
    TestServer::named(name, |c| {
        c.admin_api_keys = vec!["sk-admin".into()];
        c.tenants = vec![
            tenant("team-a", &["sk-team-a"]),
            tenant("team-b", &[&b_digest]),
        ];
        c.metrics_require_key = metrics_require_key;
    })
}

fn chat(model: &str, content: &str, user: Option<&str>) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2});
    if let Some(u) = user {
        v["user"] = json!(u);
    }
    v
}

#[test]
fn keys_decide_who_may_call_and_probes_stay_open() {
    let s = keyed("keys", false);
    let body = chat("keys", "Name a color.", None);
    let before = s
        .metric("hearth_unauthorized_requests_total")
        .unwrap_or(0.0);
    for key in [None, Some("sk-team-c"), Some("team-a"), Some("")] {
        let (status, v, www) = call(&s.base, "POST", "/v1/chat/completions", key, Some(&body));
        assert_eq!(status, 401, "{key:?}: {v}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(www.as_deref(), Some("Bearer"));
    }
    let (status, _, _) = call(&s.base, "GET", "/v1/models", None, None);
    assert_eq!(status, 401, "listing models needs a key too");
    let after = s
        .metric("hearth_unauthorized_requests_total")
        .unwrap_or(0.0);
    assert!(
        after - before >= 5.0,
        "401s are counted: {before} -> {after}"
    );

    for key in ["sk-team-a", "sk-team-b"] {
        let (status, v, _) = call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            Some(key),
            Some(&body),
        );
        assert_eq!(status, 200, "{key}: {v}");
        assert_eq!(v["object"], "chat.completion");
        let (status, v, _) = call(&s.base, "GET", "/v1/models", Some(key), None);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["data"][0]["id"], "keys");
    }
    let (status, v, _) = call(
        &s.base,
        "POST",
        "/v1/completions",
        Some("sk-admin"),
        Some(&json!({"model": "keys", "prompt": "x", "max_tokens": 1})),
    );
    assert_eq!(status, 403, "admin keys run no inference: {v}");
    assert_eq!(v["error"]["code"], "insufficient_permissions");

    for path in ["/health", "/ready", "/openapi.json", "/metrics"] {
        let (status, _, _) = call(&s.base, "GET", path, None, None);
        assert_eq!(status, 200, "{path} stays open for probes and scrapers");
    }
}

#[test]
fn metrics_can_require_an_admin_key() {
    let s = keyed("metrics-key", true);
    assert_eq!(call(&s.base, "GET", "/metrics", None, None).0, 401);
    assert_eq!(
        call(&s.base, "GET", "/metrics", Some("sk-team-a"), None).0,
        403
    );
    assert_eq!(
        call(&s.base, "GET", "/metrics", Some("sk-admin"), None).0,
        200
    );
    assert_eq!(call(&s.base, "GET", "/health", None, None).0, 200);
}

/// The prefix cache is namespaced by the tenant the key names: claiming another team's name in
/// `user` (which used to pick the namespace) reads nothing of its prompts.
#[test]
fn a_tenants_cached_prefix_is_never_a_hit_for_another_whatever_user_says() {
    let s = keyed("isolation", false);
    let memo = "Confidential memo for team A only. The acquisition target is Northwind Traders, \
                the offer is 41 dollars per share, and the board votes on the ninth of March. \
                Do not share this with anyone outside the deal team under any circumstances.";
    let cached = |key: &str, user: Option<&str>| -> u64 {
        let (status, v, _) = call(
            &s.base,
            "POST",
            "/v1/chat/completions",
            Some(key),
            Some(&chat("isolation", memo, user)),
        );
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    cached("sk-team-a", Some("alice"));
    let again = cached("sk-team-a", Some("bob"));
    assert!(
        again >= 32,
        "team A hits its own prefix whatever its user label ({again} cached)"
    );
    assert_eq!(
        cached("sk-team-b", Some("team-a")),
        0,
        "team B must not hit team A's prefix, whatever `user` claims"
    );
    let own = cached("sk-team-b", Some("alice"));
    assert!(
        own >= 32,
        "team B then hits its own copy ({own} cached): the namespace is the key's tenant"
    );
}

/// SIGHUP re-reads the config file: a revoked key stops working and a new one starts, without a
/// restart; a broken file changes nothing.
#[cfg(unix)]
#[test]
fn sighup_rotates_keys_without_a_restart() {
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("hearth-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("hearth.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let write = |keys: &str| {
        let text = format!(
            "port = {port}\nkv_cache_mib = 64\nledger_path = \"{}\"\n[[models]]\nname = \"smol\"\npath = \"{}\"\n[[tenants]]\nname = \"team-a\"\napi_keys = [{keys}]\n",
            dir.join("usage.sqlite3").display(),
            common::smollm2().display()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write("\"sk-old\"");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--device", "cpu", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    while common::agent()
        .get(&format!("{base}/ready"))
        .call()
        .ok()
        .map(|r| r.status().as_u16())
        != Some(200)
    {
        assert!(t0.elapsed().as_secs() < 120, "server did not get ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = |key: &str| call(&base, "GET", "/v1/models", Some(key), None).0;
    let hup_until = |key: &str, want: u16| {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
        let t0 = std::time::Instant::now();
        while status(key) != want {
            assert!(
                t0.elapsed().as_secs() < 10,
                "{key} did not turn {want} after SIGHUP"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    assert_eq!(status("sk-old"), 200);
    assert_eq!(status("sk-new"), 401);
    write("\"sk-new\"");
    hup_until("sk-new", 200);
    assert_eq!(status("sk-old"), 401, "the revoked key is refused");
    std::fs::write(&cfg, "this is not toml [").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        status("sk-new"),
        200,
        "a broken config keeps the current keys"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server survives a broken reload"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Over `requests_per_minute` or `max_concurrent` a tenant gets a 429 naming the limit with a
/// `Retry-After` (seconds until a retry can pass); another tenant is not affected.
#[test]
fn tenant_limits_refuse_with_429_and_retry_after() {
    let s = TestServer::named("limits", |c| {
        let mut rpm = tenant("rpm", &["sk-rpm"]);
        rpm.requests_per_minute = Some(2);
        let mut one = tenant("one-at-a-time", &["sk-one"]);
        one.max_concurrent = Some(1);
        c.tenants = vec![rpm, one, tenant("free", &["sk-free"])];
    });
    let body = json!({"model": "limits", "prompt": "Hello", "max_tokens": 1});
    let post = |key: &str, body: &Value| -> (u16, Value, Option<String>) {
        let mut r = agent()
            .post(&format!("{}/v1/completions", s.base))
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {key}"))
            .send(body.to_string())
            .expect("request sent");
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let v = serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or(Value::Null);
        (r.status().as_u16(), v, retry)
    };
    assert_eq!(post("sk-rpm", &body).0, 200);
    assert_eq!(post("sk-rpm", &body).0, 200);
    let (status, v, retry) = post("sk-rpm", &body);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests_per_minute"),
        "{v}"
    );
    // 2 per minute refill one request in 30 s.
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((25..=30).contains(&secs), "Retry-After {secs}");
    assert_eq!(
        post("sk-free", &body).0,
        200,
        "other tenants are not limited"
    );

    // A long stream holds the one slot; a second request is refused until it ends.
    let long = json!({"model": "limits", "prompt": "Count to one hundred:", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let mut stream = agent()
        .post(&format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-one")
        .send(long.to_string())
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let (status, v, retry) = post("sk-one", &body);
    assert_eq!(status, 429, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent"),
        "{v}"
    );
    assert!(retry.is_some());
    let _ = stream.body_mut().read_to_string();
    let t0 = std::time::Instant::now();
    while post("sk-one", &body).0 != 200 {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the slot is freed when the stream ends"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
