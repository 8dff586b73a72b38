//! The usage ledger over real HTTP on SmolLM2: a row for every request of a known tenant (refused
//! ones too, 401s never), `/v1/usage` isolation by key, data kept across a restart, an unwritable
//! ledger that does not stop serving, and the `hearth usage` export.
mod common;

use common::TestServer;
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

/// Status and JSON body of a request with an optional key.
fn call(
    base: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let (status, v, _) = common::call(base, method, path, key, body);
    (status, v)
}

fn server(name: &str, ledger: &std::path::Path) -> TestServer {
    let ledger = ledger.to_path_buf();
    TestServer::named(name, move |c| {
        c.admin_api_keys = vec!["sk-admin".into()];
        c.tenants = vec![
            TenantConfig::new("team-a", &["sk-a"]),
            TenantConfig::new("team-b", &["sk-b"]),
        ];
        c.ledger_path = Some(ledger);
    })
}

fn rows_by_tenant(base: &str, key: &str) -> Vec<Value> {
    let (status, v) = call(base, "GET", "/v1/usage?group_by=tenant", Some(key), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    v["data"].as_array().unwrap().clone()
}

#[test]
fn every_request_is_a_row_usage_is_isolated_by_key_and_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("hearth-ledger-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger = dir.join("usage.sqlite3");
    let mut s = server("ledger", &ledger);
    let ok = json!({"model": "ledger", "prompt": "The capital of France is", "max_tokens": 3, "user": "alice"});
    let (status, v) = call(&s.base, "POST", "/v1/completions", Some("sk-a"), Some(&ok));
    assert_eq!(status, 200, "{v}");
    let mut device_a = v["metrics"]["device_time_ms"].as_f64().unwrap();
    let stream = json!({"model": "ledger", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}});
    let events = common::sse_with_key(&s.base, "/v1/chat/completions", &stream, "sk-a");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    device_a += last["metrics"]["device_time_ms"].as_f64().unwrap();
    // Refused after the key is known: a row with its status. Unauthenticated: no row.
    let bad = json!({"model": "ledger", "prompt": "x", "temperature": -1});
    assert_eq!(
        call(&s.base, "POST", "/v1/completions", Some("sk-a"), Some(&bad)).0,
        400
    );
    assert_eq!(
        call(
            &s.base,
            "POST",
            "/v1/completions",
            Some("sk-nobody"),
            Some(&ok)
        )
        .0,
        401
    );
    assert_eq!(
        call(&s.base, "POST", "/v1/completions", Some("sk-b"), Some(&ok)).0,
        200
    );

    let mine = rows_by_tenant(&s.base, "sk-a");
    assert_eq!(mine.len(), 1, "a tenant key sees only its tenant: {mine:?}");
    assert_eq!(mine[0]["tenant"], "team-a");
    assert_eq!(
        mine[0]["requests"], 3,
        "two served and one refused: {mine:?}"
    );
    assert!(mine[0]["completion_tokens"].as_u64().unwrap() >= 2);
    let ledger_ms = mine[0]["device_time_ms"].as_f64().unwrap();
    assert!(
        (ledger_ms - device_a).abs() < 0.01,
        "ledger {ledger_ms} ms vs responses {device_a} ms"
    );
    let all = rows_by_tenant(&s.base, "sk-admin");
    assert_eq!(all.len(), 2, "an admin key sees every tenant: {all:?}");
    assert_eq!(
        call(
            &s.base,
            "GET",
            "/v1/usage?tenant=team-a",
            Some("sk-b"),
            None
        )
        .0,
        403
    );
    let (status, v) = call(
        &s.base,
        "GET",
        "/v1/usage?group_by=user,model",
        Some("sk-a"),
        None,
    );
    assert_eq!(status, 200);
    let users: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["user"].as_str())
        .collect();
    assert!(users.contains(&"alice"), "{v}");
    assert_eq!(
        call(
            &s.base,
            "GET",
            "/v1/usage?group_by=colour",
            Some("sk-a"),
            None
        )
        .0,
        400
    );
    assert_eq!(call(&s.base, "GET", "/v1/usage", None, None).0, 401);

    // A restart on the same file keeps every row.
    let running = s.server.take().unwrap();
    s.rt.block_on(running.shutdown(std::time::Duration::from_secs(5)));
    drop(s);
    let s = server("ledger", &ledger);
    let again = rows_by_tenant(&s.base, "sk-admin");
    assert_eq!(again, all, "the ledger survives a restart");

    // The export command reads the same file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["usage", "--ledger"])
        .arg(&ledger)
        .args(["--group-by", "tenant", "--format", "csv"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "tenant,requests,prompt_tokens,cached_tokens,completion_tokens,device_time_ms,cache_hits,saved_device_time_ms"
    );
    assert!(lines[1].starts_with("team-a,3,"), "{csv}");
    assert!(lines[2].starts_with("team-b,1,"), "{csv}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_ledger_does_not_stop_serving_and_writes_its_rows_once_it_can() {
    // A path under a regular file can never be created.
    let blocker = std::env::temp_dir().join(format!("hearth-not-a-dir-{}", std::process::id()));
    std::fs::write(&blocker, b"x").unwrap();
    let s = server("unwritable", &blocker.join("usage.sqlite3"));
    let dropped = "hearth_ledger_rows_dropped_total";
    let before = s.metric(dropped).unwrap_or(0.0);
    let ok = json!({"model": "unwritable", "prompt": "Hello", "max_tokens": 2});
    for _ in 0..3 {
        assert_eq!(
            call(&s.base, "POST", "/v1/completions", Some("sk-a"), Some(&ok)).0,
            200
        );
    }
    // The usage query flushes: the writer has tried, and the rows wait in memory.
    let (status, v) = call(&s.base, "GET", "/v1/usage", Some("sk-admin"), None);
    assert_eq!(status, 200);
    let written = |v: &Value| v["data"][0]["requests"].as_u64().unwrap_or(0);
    assert_eq!(written(&v), 0, "nothing written yet: {v}");
    // Once the folder can be made, the writer's next try writes all three.
    std::fs::remove_file(&blocker).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, v) = call(&s.base, "GET", "/v1/usage", Some("sk-admin"), None);
        if written(&v) == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting rows are written once the ledger can be: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(
        s.metric(dropped).unwrap_or(0.0),
        before,
        "no row was lost on the way"
    );
    // From then on a request right after a query is in the next query at once.
    for n in 4..=5 {
        assert_eq!(
            call(&s.base, "POST", "/v1/completions", Some("sk-a"), Some(&ok)).0,
            200
        );
        let (_, v) = call(&s.base, "GET", "/v1/usage", Some("sk-admin"), None);
        assert_eq!(written(&v), n, "{v}");
    }
    let _ = std::fs::remove_dir_all(&blocker);
}

/// Send a request over a raw connection, read `read` bytes of the answer (0: none), then leave.
fn leave_early(base: &str, body: &Value, read: usize) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer sk-a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    if read > 0 {
        let mut buf = vec![0u8; read];
        c.read_exact(&mut buf).unwrap();
    } else {
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
}

#[test]
fn a_request_whose_client_leaves_is_billed_for_all_the_device_time_it_used() {
    let dir = std::env::temp_dir().join(format!("hearth-ledger-left-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = server("left", &dir.join("usage.sqlite3"));
    let counter = "hearth_tenant_device_seconds_total{tenant=\"team-a\",model=\"left\"}";
    let before = s.metric(counter).unwrap_or(0.0);
    // A JSON request left before its answer, and a stream left after its first chunks: both
    // were running when their clients went.
    let long = |stream: bool| json!({"model": "left", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": stream});
    leave_early(&s.base, &long(false), 0);
    leave_early(&s.base, &long(true), 600);
    // Their rows are written once the engine has handed back their last steps' device time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let row = loop {
        let rows = rows_by_tenant(&s.base, "sk-admin");
        if let Some(r) = rows.iter().find(|r| r["requests"] == 2) {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows not written: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let used = s.metric(counter).unwrap() - before;
    let billed = row["device_time_ms"].as_f64().unwrap() / 1e3;
    assert!(used > 0.0);
    assert!(
        (billed - used).abs() <= 0.01 * used,
        "ledger bills {billed:.6} s, the tenant's counter moved {used:.6} s"
    );
    let generated = row["completion_tokens"].as_u64().unwrap();
    assert!(
        generated > 0 && generated < 800,
        "the tokens generated before the clients left: {row}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
