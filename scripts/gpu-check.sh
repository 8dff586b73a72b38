#!/usr/bin/env bash
# The one-call GPU check, run on the GPU machine from the repository root:
#   scripts/gpu-check.sh [BINARY] [TOKENIZER_JSON]
# BINARY is Hearth built here by scripts/build-cuda.sh (default .gpu/hearth) and TOKENIZER_JSON a
# tokenizer.json carried with it (default .gpu/tokenizer.json; `hearth export-tokenizer` writes one).
# Needs the machine's Python with torch and transformers; no network, no Rust. Prints a Markdown table
# and writes it (plus JSON) to $OUT if set. Bounded to under 5 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${1:-.gpu/hearth}"
# The binary may travel compressed (the device tool carries at most 64 MiB).
if [ ! -e "$bin" ] && [ -e "$bin.gz" ]; then gunzip -k "$bin.gz"; fi
tok="${2:-.gpu/tokenizer.json}"
out="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$out"
chmod +x "$bin"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# The binary links CUDA's runtime, cuBLAS and cuRAND dynamically: take them from the Python
# install's NVIDIA wheels (the driver brings libcuda).
libdirs="$(python3 - <<'PY'
import glob, os
import nvidia
dirs = set()
for base in nvidia.__path__:
    for f in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$bin" | grep "not found"; then
    echo "[gpu-check] missing shared libraries (above)" >&2
    exit 1
fi
PYTHONUNBUFFERED=1 timeout 280 python3 scripts/gpu_check.py --bin "$bin" --tokenizer "$tok" \
    --work /tmp/gpu-check-work --out "$out/gpu-check.md"
