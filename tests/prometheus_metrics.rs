//! /metrics as a platform team scrapes it: Prometheus' own linter (`promtool check metrics`,
//! Debian's `prometheus` package, installed by scripts/test.sh) passes before and after traffic,
//! every metric has HELP text, the series of every served model, route group and configured
//! tenant exist at zero from start-up, and every series the shipped Grafana dashboard and alert
//! rules query exists on a live server. The alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`).
mod common;

use common::TestServer;
use hearth::tenancy::TenantConfig;
use std::io::Write;
use std::process::{Command, Stdio};

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `hearth_*` metric names an expression (or a file of them) mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("hearth_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every expression of the shipped dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/hearth.json")).unwrap())
            .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    out
}

fn scrape(s: &TestServer) -> String {
    common::agent()
        .get(&format!("{}/metrics", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// promtool's verdict on `text`: its exit status and what it printed.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's `prometheus` package; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The one lint problem allowed: the colon in vLLM's names, which inference gateways scrape
    // by those exact names (promtool exits 3 for lint problems, other codes for errors).
    let rest: Vec<&str> = said
        .lines()
        .filter(|l| !(l.starts_with("vllm:") && l.ends_with("metric names should not contain ':'")))
        .collect();
    let lint_only = out.status.code() == Some(3);
    (
        out.status.success() || (lint_only && rest.is_empty()),
        rest.join("\n"),
    )
}

#[test]
fn metrics_pass_promtool_and_every_series_exists_from_start_up() {
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("lint-smol", "lint-gemma"),
        tenants: vec![
            TenantConfig::new("lint-a", &["sk-lint-a"]),
            TenantConfig::new("lint-b", &["sk-lint-b"]),
        ],
        ..Default::default()
    });
    let before = scrape(&s);
    let (ok, said) = promtool(&before);
    assert!(ok, "promtool: {said}");
    assert!(said.trim().is_empty(), "promtool warns: {said}");
    // Every metric that has a series carries its HELP text.
    for line in before.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            before.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    // Nothing has run, and yet each served model, route and tenant has its series, at zero.
    for series in [
        "hearth_generation_tokens_total{model=\"lint-smol\"}",
        "hearth_request_success_total{model=\"lint-gemma\"}",
        "hearth_time_to_first_token_seconds_count{model=\"lint-gemma\"}",
        "hearth_tenant_tokens_total{tenant=\"lint-b\",model=\"lint-smol\",kind=\"completion\"}",
        "hearth_tenant_requests_total{tenant=\"lint-a\",model=\"auto\",status=\"200\"}",
        "hearth_tenant_device_seconds_total{tenant=\"lint-b\",model=\"lint-gemma\"}",
        "hearth_router_decisions_total{route=\"auto\",model=\"lint-smol\",reason=\"confident\"}",
        "hearth_router_escalations_total{route=\"auto\",from=\"lint-smol\",to=\"lint-gemma\",reason=\"low_logprob\"}",
        "hearth_response_cache_requests_total{result=\"hit\",kind=\"semantic\"}",
        "hearth_response_mean_logprob_count{model=\"lint-gemma\",route=\"auto\"}",
        "hearth_quality_drift{model=\"lint-smol\",signal=\"mean_logprob\"}",
        "hearth_quality_window_responses{model=\"lint-gemma\",window=\"24h\"}",
    ] {
        assert_eq!(s.metric(series), Some(0.0), "{series}");
    }
    // After traffic the text still passes, and the tenant's series moved.
    let (code, body, _) = common::call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        Some("sk-lint-a"),
        Some(&serde_json::json!({"model": "auto", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})),
    );
    assert_eq!(code, 200, "{body}");
    let (ok, said) = promtool(&scrape(&s));
    assert!(
        ok && said.trim().is_empty(),
        "promtool after traffic: {said}"
    );
    assert!(
        s.metric("hearth_tenant_requests_total{tenant=\"lint-a\",model=\"auto\",status=\"200\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    // Every series the dashboard and the alerts query is exported.
    let text = scrape(&s);
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    let alerts = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    for name in queries
        .iter()
        .flat_map(|q| metric_names(q))
        .chain(metric_names(&alerts))
    {
        let present = text
            .lines()
            .any(|l| l.starts_with(&name) && l[name.len()..].starts_with(['{', ' ']));
        assert!(present, "{name} is queried but not exported");
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(repo(""))
            .output()
            .expect("promtool runs (Debian's `prometheus` package; scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
