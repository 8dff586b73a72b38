#!/usr/bin/env bash
# The whole test suite: fetch the real models and the pinned OpenAI client if missing, then every test
# (unit, integration, real models, HTTP, the official Python client).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch-models.sh
if [ ! -x .venv-test/bin/python ] || ! .venv-test/bin/python -c 'import openai, pytest, schemathesis, openapi_spec_validator, jsonschema, langchain_openai, grpc, opentelemetry.proto, selenium, kubernetes_validate, zmq, msgpack' 2>/dev/null; then
    echo "[test] installing the pinned OpenAI client and API-contract tools into .venv-test" >&2
    python3 -m venv .venv-test
    .venv-test/bin/pip install --quiet --no-cache-dir openai==3.51.0 pytest==9.2.0 schemathesis==4.32.5 \
        openapi-spec-validator==0.9.0 jsonschema==4.26.0 \
        langchain-openai==1.7.4 opentelemetry-proto==1.45.2 grpcio==1.85.3 protobuf==7.36.2 \
        selenium==4.51.0 kubernetes-validate==1.37.0 \
        pyzmq==27.3.0 msgpack==1.2.4
fi
if [ ! -x /usr/bin/chromedriver ]; then
    # tests/console.rs drives the web console in headless Chromium.
    echo "[test] installing chromium and chromium-driver (Debian)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
fi
if ! command -v promtool >/dev/null 2>&1; then
    # tests/prometheus_metrics.rs checks /metrics with Prometheus' own linter.
    echo "[test] installing promtool (Debian's prometheus package)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    # tests/ledger_postgres.rs runs the usage ledger against a real PostgreSQL (a throwaway
    # cluster per test; the package's own cluster is not used).
    echo "[test] installing postgresql (Debian)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null; } \
        || echo "[test] postgresql cannot be installed here: the PostgreSQL ledger tests will say SKIPPED" >&2
fi
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    # Installed: a ledger test that cannot start it fails rather than skips.
    export HEARTH_REQUIRE_POSTGRES=1
fi
cargo test --release
