//! Drives the official `openai` Python client (pinned in scripts/test.sh) against two live servers:
//! the normal one and a tiny one (one running slot, one waiting slot, 4 KiB bodies) for 429 and 413.
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
    let out = std::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("tests/python"))
        .env("HEARTH_BASE_URL", &main.base)
        .env("HEARTH_TINY_URL", &tiny.base)
        .output()
        .expect("pytest runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{log}");
    assert!(log.contains("9 passed"), "{log}");
}
