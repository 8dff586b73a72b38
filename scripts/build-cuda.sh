#!/usr/bin/env bash
# Build Hearth with the CUDA backend (sm_90: H100 / H200) on a machine without a GPU or a CUDA install.
# CUDA's compiler and libraries come from PyPI, pinned to 13.0.x: the GPU machines' driver is CUDA 13.0 and
# refuses PTX from a newer nvcc. The toolchain lands in .cuda/ (git-ignored); the build in target/cuda/.
# Output: target/cuda/release/hearth
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${HEARTH_CUDA_DIR:-$PWD/.cuda}"
venv="$root/venv"
tk="$root/toolkit"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null \
    || [ ! -e "$root/.installed-13.0.88" ]; then
    echo "[build-cuda] installing CUDA 13.0 compiler and libraries from PyPI into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    # One pip call: nvidia-nvvm carries cicc, and a second install into the same tree can skip it.
    "$venv/bin/pip" install --quiet --no-cache-dir \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    touch "$root/.installed-13.0.88"
fi
cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[ -x "$cu/bin/nvcc" ] || { echo "[build-cuda] nvcc missing under $cu" >&2; exit 1; }

# A toolkit-shaped folder: the wheels ship only versioned library names and no libcuda.
rm -rf "$tk"
mkdir -p "$tk/lib64/stubs"
for d in bin include nvvm; do ln -s "$cu/$d" "$tk/$d"; done
for f in "$cu"/lib/lib*.so.*; do
    name="$(basename "$f")"
    ln -sf "$f" "$tk/lib64/$name"
    ln -sf "$f" "$tk/lib64/${name%%.so.*}.so"
done
# libcuda comes with the driver on the GPU machine; linking only needs its symbol names, which are the
# driver functions cudarc binds.
cargo fetch --quiet
sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)"
grep -oE '^ *fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^ *fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$tk/lib64/stubs/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib64/stubs/libcuda.so" "$tk/lib64/stubs/cuda_stub.c"

export CUDA_HOME="$tk" CUDA_PATH="$tk" CUDA_ROOT="$tk"
export PATH="$tk/bin:$PATH"
export LIBRARY_PATH="$tk/lib64:$tk/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$tk/lib64:$tk/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# No GPU here to ask: name the target (candle-kernels and build.rs read it).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2 >&2
cargo build --release --features cuda --target-dir target/cuda "$@"
echo "[build-cuda] built target/cuda/release/hearth" >&2
