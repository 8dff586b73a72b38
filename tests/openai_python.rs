//! Drives the official `openai` Python client (pinned in scripts/test.sh) against live servers: the
//! normal one, a tiny one (one running slot, one waiting slot, 4 KiB bodies) for 429 and 413, and
//! one with both models and route groups (`auto`, and `escalate`, which always escalates);
//! then checks the API contract (tests/python/test_api_contract.py): a valid /openapi.json, responses
//! that validate against OpenAI's published schemas, and a schemathesis fuzz run with no 5xx against
//! a server that caps generation at 16 tokens per request.
mod common;

use std::path::PathBuf;

use common::TestServer;

#[test]
fn official_openai_client_works_against_hearth() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which installs the pinned openai client",
        python.display()
    );
    let main = TestServer::smol(|_| {});
    let tiny = TestServer::smol(|c| {
        c.max_seqs = 1;
        c.max_waiting = 1;
        c.max_body_bytes = 4096;
    });
    // Both models, the default `auto` group and one that always escalates.
    let routed = TestServer::start(hearth::config::Config {
        models: common::both_models("small", "large"),
        routes: vec![
            hearth::router::RouteConfig {
                name: "auto".into(),
                models: vec!["small".into(), "large".into()],
                ..Default::default()
            },
            common::always_escalates("escalate", "small", "large"),
        ],
        ..Default::default()
    });
    let fuzz = TestServer::named("smollm2-135m-instruct", |c| {
        c.max_request_tokens = 16;
        c.default_max_tokens = 4;
    });
    let out = std::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("tests/python"))
        .env("HEARTH_BASE_URL", &main.base)
        .env("HEARTH_TINY_URL", &tiny.base)
        .env("HEARTH_FUZZ_URL", &fuzz.base)
        .env("HEARTH_ROUTED_URL", &routed.base)
        .output()
        .expect("pytest runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{log}");
    assert!(log.contains("24 passed"), "{log}");
}
