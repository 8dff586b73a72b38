#!/usr/bin/env bash
# The one-call GPU check, run on the GPU machine from the repository root:
#   scripts/gpu-check.sh [BINARY] [TOKENIZER_JSON]
# BINARY is Hearth built here by scripts/build-cuda.sh (default .gpu/hearth) and TOKENIZER_JSON a
# tokenizer.json carried with it (default .gpu/tokenizer.json; `hearth export-tokenizer` writes one).
# The GGUF part needs the `gguf` package from PyPI unpacked under .gpu/pylib (`pip download --no-deps
# gguf`, then unzip the wheel there); without it that part is skipped.
# Needs the machine's Python with torch and transformers; no network, no Rust. Prints Markdown tables
# and writes them (plus JSON) to $OUT if set. Bounded to under 5 minutes.
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
# An earlier build carried as .gpu/hearth-before(.gz) is benchmarked alongside (before / after).
before=()
if [ ! -e .gpu/hearth-before ] && [ -e .gpu/hearth-before.gz ]; then gunzip -k .gpu/hearth-before.gz; fi
if [ -e .gpu/hearth-before ]; then chmod +x .gpu/hearth-before; before=(--before .gpu/hearth-before); fi
status=0
PYTHONUNBUFFERED=1 timeout 220 python3 scripts/gpu_check.py --bin "$bin" --tokenizer "$tok" \
    --work /tmp/gpu-check-work --out "$out/gpu-check.md" "${before[@]}" || status=$?
if [ -d .gpu/pylib/gguf ]; then
    PYTHONUNBUFFERED=1 timeout 70 python3 scripts/gguf_check.py --bin "$bin" --tokenizer "$tok" \
        --gguf-lib .gpu/pylib --work /tmp/gguf-check-work --out "$out/gpu-check.md" || status=$?
else
    echo "[gpu-check] .gpu/pylib/gguf missing: GGUF check skipped" >&2
fi
# Where a decode step's device time goes, op by op: CUDA events between the decoder's ops, as nodes
# of the decode graphs, then eagerly at batch 256 (eager, where the host is slower than the GPU, an
# op's time includes the GPU's wait for it).
if [ -d /tmp/gpu-check-work/model ]; then
    for run in "1 1 1,64,256" "0 1 256" "1 0 256"; do
        read -r graphs gqa batches <<<"$run"
        echo "" | tee -a "$out/gpu-check.md"
        echo "Op profile, HEARTH_CUDA_GRAPHS=$graphs HEARTH_ATTN_GQA=$gqa:" | tee -a "$out/gpu-check.md"
        HEARTH_CUDA_PROFILE=1 HEARTH_CUDA_GRAPHS=$graphs HEARTH_ATTN_GQA=$gqa timeout 60 "$bin" bench \
            --model /tmp/gpu-check-work/model --device cuda:0 --batches "$batches" --decode-tokens 32 \
            --prefill-tokens 16 --repeat 1 --kv-cache-mib 4096 2>/dev/null | tee -a "$out/gpu-check.md" \
            || echo "[gpu-check] op profile failed" >&2
    done
fi
exit "$status"
