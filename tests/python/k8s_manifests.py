"""Validates deploy/kubernetes/ offline, for tests/kubernetes.rs: core resources against the
Kubernetes API schemas (`kubernetes-validate`, strict: unknown fields are errors), custom resources
(InferencePool, HTTPRoute, ServiceMonitor) against their CRDs' schemas vendored in
tests/data/crds/; then checks that the pieces fit together (selectors, ports, probes, the grace
period against the drain timeout, the dashboard ConfigMap against deploy/grafana/hearth.json).
Writes the ConfigMap's hearth.toml to OUT_TOML, for the Rust side to load with Hearth's own parser.

    python k8s_manifests.py DEPLOY_DIR CRD_DIR GRAFANA_JSON OUT_TOML
"""
import glob
import json
import os
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

DEPLOY, CRDS, GRAFANA, OUT_TOML = sys.argv[1:5]
K8S_VERSION = "1.33.0"


def crd_schemas():
    out = {}
    for path in glob.glob(os.path.join(CRDS, "*.json")):
        with open(path) as f:
            d = json.load(f)
        out[(d["apiVersion"], d["kind"])] = d["schema"]
    return out


def main():
    schemas = crd_schemas()
    docs = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((os.path.basename(path), doc))
    assert docs, "no manifests"
    by_kind = {}
    for name, doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in schemas:
            jsonschema.validate(doc, schemas[key])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        by_kind.setdefault(doc["kind"], []).append(doc)
        print(f"valid: {name} {doc['kind']} {doc['metadata']['name']}")

    for kind in ["Deployment", "Service", "ConfigMap", "ServiceMonitor", "InferencePool", "HTTPRoute",
                 "PersistentVolumeClaim"]:
        assert kind in by_kind, f"no {kind}"

    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    c = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert labels.get("llm-d.ai/engine-type") == "vllm"

    def selects(selector):
        return all(labels.get(k) == v for k, v in selector.items())

    svc = by_kind["Service"][0]
    assert selects(svc["spec"]["selector"])
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    mon = by_kind["ServiceMonitor"][0]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in mon["spec"]["selector"]["matchLabels"].items())
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"

    # The config the pods load: served on the port the probes use, draining within the grace
    # period once the preStop pause is over.
    config = next(d for d in by_kind["ConfigMap"] if "hearth.toml" in d["data"])
    toml_text = config["data"]["hearth.toml"]
    cfg = tomllib.loads(toml_text)
    assert cfg["port"] == ports["http"] and cfg["host"] == "0.0.0.0"
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert pause + cfg["drain_timeout_secs"] < grace, (pause, cfg["drain_timeout_secs"], grace)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    assert mounts["config"] == "/etc/hearth"
    for m in cfg["models"] + cfg["embedding_models"]:
        assert m["path"].startswith(mounts["models"] + "/"), m
    assert os.path.dirname(cfg["ledger_path"]) == mounts["data"]
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == by_kind["PersistentVolumeClaim"][0]["metadata"]["name"]

    pool = by_kind["InferencePool"][0]
    check_pool(pool, selects, ports)
    route = by_kind["HTTPRoute"][0]
    refs = [r for rule in route["spec"]["rules"] for r in rule["backendRefs"]]
    assert any(r.get("kind") == "InferencePool" and r["name"] == pool["metadata"]["name"]
               and r.get("group") == pool["apiVersion"].split("/")[0] for r in refs), refs

    board = next(d for d in by_kind["ConfigMap"] if "hearth.json" in d["data"])
    with open(GRAFANA) as f:
        assert json.loads(board["data"]["hearth.json"]) == json.load(f), "the dashboard ConfigMap is stale"

    with open(OUT_TOML, "w") as f:
        f.write(toml_text)
    print("manifests ok")


def check_pool(pool, selects, ports):
    spec = pool["spec"]
    selector = spec["selector"]
    assert selects(selector.get("matchLabels", selector)), selector
    targets = [t["number"] for t in spec["targetPorts"]]
    assert ports["http"] in targets, (targets, ports)


if __name__ == "__main__":
    main()
