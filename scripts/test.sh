#!/usr/bin/env bash
# The whole test suite: fetch the real models if missing, then every test (unit, integration, real models).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch-models.sh
cargo test --release
