//! The web console at `/`: its page and assets come from the binary and name nothing outside it
//! (a content-security policy says so too), the live feed is behind the API keys and shows a
//! tenant only its own usage and errors, and in a real browser (headless Chromium driven by
//! selenium, tests/python/console_browser.py) a prompt typed with the keyboard streams its reply,
//! the live view refreshes, and a phone-sized screen needs no horizontal scrolling.
mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;

use common::{agent, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const KEY: &str = "console-key-1";
const OTHER: &str = "console-key-2";
const ADMIN: &str = "console-admin-1";

fn server(name: &str, f: impl FnOnce(&mut hearth::config::Config)) -> TestServer {
    TestServer::named(name, |c| {
        c.tenants = vec![
            TenantConfig::new("console-team", &[KEY]),
            TenantConfig::new("other-team", &[OTHER]),
        ];
        c.admin_api_keys = vec![ADMIN.into()];
        f(c);
    })
}

/// Status, content type, content-security policy and body of a GET.
fn get(base: &str, path: &str) -> (u16, String, String, String) {
    let mut r = agent().get(&format!("{base}{path}")).call().unwrap();
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (ct, csp) = (h("content-type"), h("content-security-policy"));
    let status = r.status().as_u16();
    (status, ct, csp, r.body_mut().read_to_string().unwrap())
}

/// The live feed's first snapshot for `key`, or the refusal's status.
fn snapshot(base: &str, key: Option<&str>) -> Result<Value, u16> {
    let mut rq = agent().get(&format!("{base}/console/live"));
    if let Some(k) = key {
        rq = rq.header("authorization", &format!("Bearer {k}"));
    }
    let mut r = rq.call().unwrap();
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let line = BufReader::new(r.body_mut().as_reader())
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("data: ").map(String::from))
        .expect("a snapshot");
    Ok(serde_json::from_str(&line).unwrap())
}

fn chat(base: &str, key: &str, body: &Value) -> u16 {
    agent()
        .post(&format!("{base}/v1/chat/completions"))
        .header("authorization", &format!("Bearer {key}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn the_page_is_self_contained_and_the_feed_is_behind_the_keys() {
    let s = server("console-feed", |_| {});
    let (status, ct, csp, html) = get(&s.base, "/");
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "{ct}");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    for (path, kind) in [
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let (status, ct, _, body) = get(&s.base, path);
        assert_eq!(status, 200, "{path}");
        assert!(ct.starts_with(kind), "{path}: {ct}");
        // Offline: nothing is loaded from another host.
        for far in ["http://", "https://", "url(//", "src=\"//"] {
            assert!(!body.contains(far), "{path} names {far}");
        }
    }
    assert!(!html.contains("http://") && !html.contains("https://"));

    assert_eq!(snapshot(&s.base, None).unwrap_err(), 401);
    assert_eq!(snapshot(&s.base, Some("sk-wrong")).unwrap_err(), 401);

    // A refused request by each tenant: each sees its own error only; the admin sees both.
    let bad = json!({"model": "console-feed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1});
    assert_eq!(chat(&s.base, KEY, &bad), 400);
    assert_eq!(chat(&s.base, OTHER, &bad), 400);
    let ok = json!({"model": "console-feed", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4});
    assert_eq!(chat(&s.base, KEY, &ok), 200);

    let mine = snapshot(&s.base, Some(KEY)).unwrap();
    assert_eq!(mine["scope"], "tenant console-team");
    let errors = mine["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    assert!(
        errors.iter().all(|e| e["tenant"] == "console-team"),
        "{mine}"
    );
    assert_eq!(errors[0]["status"], 400);
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
    let models = mine["models"].as_array().unwrap();
    assert_eq!(models[0]["name"], "console-feed");
    assert!(models[0]["kv_usage"].as_f64().unwrap() >= 0.0);
    // Today's usage: this tenant's row only (the refusal and the answer).
    let usage = mine["usage_today"].as_array().unwrap();
    assert_eq!(usage.len(), 1, "{mine}");
    assert_eq!(usage[0]["tenant"], "console-team");
    assert!(usage[0]["requests"].as_u64().unwrap() >= 2);

    let all = snapshot(&s.base, Some(ADMIN)).unwrap();
    assert_eq!(all["scope"], "admin");
    let tenants: Vec<&str> = all["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["tenant"].as_str().unwrap())
        .collect();
    assert!(tenants.contains(&"console-team") && tenants.contains(&"other-team"));
    assert_eq!(all["usage_today"].as_array().unwrap().len(), 2);
}

#[test]
fn live_feeds_are_capped_per_tenant() {
    let s = server("console-cap", |_| {});
    let open = |key: &str| {
        agent()
            .get(&format!("{}/console/live", s.base))
            .header("authorization", &format!("Bearer {key}"))
            .call()
            .unwrap()
    };
    // Four feeds of one tenant stay open; a fifth is refused, another tenant's is not.
    let held: Vec<_> = (0..4).map(|_| open(KEY)).collect();
    assert!(held.iter().all(|r| r.status() == 200));
    let mut fifth = open(KEY);
    assert_eq!(fifth.status(), 429);
    let body: Value = serde_json::from_str(&fifth.body_mut().read_to_string().unwrap()).unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("live views"));
    assert_eq!(open(OTHER).status(), 200);
    // A closed feed gives its place back (once the server notices, at its next tick).
    drop(held);
    let t0 = std::time::Instant::now();
    while open(KEY).status() != 200 {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the closed feeds' places never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn with_metrics_behind_a_key_a_tenant_sees_no_engine_gauges() {
    let s = server("console-closed", |c| c.metrics_require_key = true);
    assert!(snapshot(&s.base, Some(KEY)).unwrap()["models"].is_null());
    assert!(snapshot(&s.base, Some(ADMIN)).unwrap()["models"].is_array());
}

#[test]
fn in_a_real_browser_a_prompt_streams_and_the_live_view_refreshes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-test/bin/python");
    assert!(
        python.exists() && PathBuf::from("/usr/bin/chromedriver").exists(),
        "run scripts/test.sh, which installs chromium, chromium-driver and selenium"
    );
    let s = server("console-browser", |_| {});
    let shots = std::env::var_os("HEARTH_CONSOLE_SHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("hearth-console-{}", std::process::id()))
        });
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new(&python)
        .arg(root.join("tests/python/console_browser.py"))
        .args([&s.base, KEY, "console-browser"])
        .arg(&shots)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shots.join("console.png").exists() && shots.join("console-narrow.png").exists());
}
