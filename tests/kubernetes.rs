//! deploy/kubernetes/ validated offline (tests/python/k8s_manifests.py): core resources against the
//! Kubernetes API schemas (`kubernetes-validate`, strict), the InferencePool, HTTPRoute and
//! ServiceMonitor against their CRDs' schemas (tests/data/crds/), the pieces fitting together; and
//! the config the pods mount loads with Hearth's own parser. A broken manifest must fail.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run the validator on `dir`: its success and what it printed.
fn validate(dir: &Path, toml_out: &Path) -> (bool, String) {
    let python = root().join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "run scripts/test.sh, which installs kubernetes-validate"
    );
    let out = Command::new(python)
        .arg(root().join("tests/python/k8s_manifests.py"))
        .arg(dir)
        .arg(root().join("tests/data/crds"))
        .arg(root().join("deploy/grafana/hearth.json"))
        .arg(toml_out)
        .output()
        .expect("python runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hearth-k8s-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_manifests_validate_and_fit_together() {
    let out = scratch("ok");
    let toml = out.join("hearth.toml");
    let (ok, said) = validate(&root().join("deploy/kubernetes"), &toml);
    assert!(ok, "{said}");
    for kind in [
        "Deployment",
        "Service",
        "InferencePool",
        "HTTPRoute",
        "ServiceMonitor",
    ] {
        assert!(
            said.contains(&format!(" {kind} ")),
            "{kind} not validated: {said}"
        );
    }
    let cfg = hearth::config::Config::load(Some(&toml)).expect("the mounted config loads");
    assert_eq!(cfg.port, 8080);
    // One decoder per pod, as the gateway's picker reads the gauges.
    assert_eq!(cfg.models.len(), 1);
    assert!(cfg.directory().is_ok());
}

#[test]
fn a_broken_manifest_is_caught() {
    let src = root().join("deploy/kubernetes");
    for (tag, file, from, to) in [
        // A misspelt field: strict validation knows every field of a Deployment.
        (
            "typo",
            "deployment.yaml",
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
        ),
        // The pool must name the port the pods serve on.
        ("port", "inferencepool.yaml", "number: 8080", "number: 9090"),
        // A grace period shorter than the preStop pause plus the drain.
        (
            "grace",
            "deployment.yaml",
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 20",
        ),
        // The route must point at the pool as an InferencePool, not as a Service.
        (
            "route",
            "httproute.yaml",
            "kind: InferencePool",
            "kind: Service",
        ),
    ] {
        let dir = scratch(tag);
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            let mut text = std::fs::read_to_string(&p).unwrap();
            if p.file_name().unwrap() == file {
                assert!(text.contains(from), "{file} has no `{from}`");
                text = text.replacen(from, to, 1);
            }
            std::fs::write(dir.join(p.file_name().unwrap()), text).unwrap();
        }
        let (ok, said) = validate(&dir, &dir.join("hearth.toml"));
        assert!(!ok, "{tag}: the broken manifest passed: {said}");
    }
}
