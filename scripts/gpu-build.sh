#!/usr/bin/env bash
# Builds the CUDA bundle that scripts/gpu-check.sh runs on the GPU machine (which has no Rust and no
# network). Runs here, on a machine without a GPU; idempotent (a second run rebuilds only what changed).
#
#   bash scripts/gpu-build.sh            # last line of output: the bundle folder to carry
#
# What it does:
# 1. Installs NVIDIA's CUDA 13.0 compiler from PyPI into a cache folder (no apt sources needed).
#    Pinned to 13.0: driver 580 (the GPU machine's) refuses PTX written by nvcc >= 13.1.
# 2. Makes a copy of candle-core whose manifest asks cudarc for `dynamic-loading` (dlopen of the CUDA
#    libraries at run time) instead of `dynamic-linking` (link the build machine's libraries); cudarc
#    refuses both at once, so feature unification cannot do it. The copy is used through a
#    command-line `[patch]` by this build only: the CPU build, Cargo.toml and Cargo.lock are untouched.
# 3. Links CUDA's runtime statically (candle-kernels asks for `-lcudart`; a linker script named
#    libcudart.so hands the linker libcudart_static.a), so the binary needs no CUDA library to start:
#    on a machine without a driver `--device auto` runs on the CPU after one line saying why.
# 4. Builds (release, sm_90) the CLI, the GPU correctness tests (tests/gpu.rs) and the step benchmark,
#    strips them and compresses them with xz into the bundle folder (ignored by git).
#
# Environment: PEFT_SFT_CUDA_CLIPPY=1 also lints the CUDA build (`cargo clippy --features cuda
# --all-targets -D warnings`: the CPU CI never compiles the CUDA code);
# PEFT_SFT_CUDA_CACHE (compiler cache, default ~/.cache/peft-sft/cuda-13.0),
# CUDA_COMPUTE_CAP (default 90), PEFT_SFT_CUDA_TARGET (cargo target folder, default
# ~/.cache/peft-sft/cuda-target).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=${PEFT_SFT_CUDA_CACHE:-$HOME/.cache/peft-sft/cuda-13.0}
# Outside the checkout, so a later checkout on this machine rebuilds in minutes, not 16.
target=${PEFT_SFT_CUDA_TARGET:-$HOME/.cache/peft-sft/cuda-target}
bundle=$root/gpu-bundle
cap=${CUDA_COMPUTE_CAP:-90}

# --- 1. the pinned compiler -----------------------------------------------------------------------
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
cuda=$cache/site/nvidia/cu13
if [[ "$(cat "$cache/wheels.txt" 2>/dev/null)" != "${wheels[*]}" ]]; then
  echo "installing the CUDA 13.0 compiler into $cache"
  rm -rf "$cache/site"
  mkdir -p "$cache"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$cache/site" "${wheels[@]}"
  echo "${wheels[*]}" >"$cache/wheels.txt"
fi
"$cuda/bin/nvcc" --version | grep -q "release 13.0" || {
  echo "error: $cuda/bin/nvcc is not CUDA 13.0; remove $cache and run again" >&2
  exit 1
}

# --- 3. static CUDA runtime behind the name the linker is asked for --------------------------------
mkdir -p "$cache/link"
echo "INPUT($cuda/lib/libcudart_static.a -lrt -lpthread -ldl)" >"$cache/link/libcudart.so"

# --- 2. candle-core asking cudarc for dynamic loading ----------------------------------------------
candle_core=$(cargo metadata --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-core").rsplit("/", 1)[0])')
patched=$cache/patch/$(basename "$candle_core")
if [[ ! -f "$patched/Cargo.toml" ]] || ! grep -q '"dynamic-loading"' "$patched/Cargo.toml"; then
  rm -rf "$patched"
  mkdir -p "$(dirname "$patched")"
  cp -r "$candle_core" "$patched"
  # The one-word change (the copy's own checksum file does not apply to a path dependency).
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$patched/Cargo.toml"
  rm -f "$patched/.cargo-ok" "$patched/.cargo_vcs_info.json"
fi
grep -q '"dynamic-loading"' "$patched/Cargo.toml"
if grep -q '"dynamic-linking"' "$patched/Cargo.toml"; then
  echo "error: $patched/Cargo.toml still asks for dynamic-linking" >&2
  exit 1
fi

# --- 4. build --------------------------------------------------------------------------------------
export PATH="$cuda/bin:$PATH" CUDA_HOME="$cuda" CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP="$cap" CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="$target"
export RUSTFLAGS="-L native=$cache/link"
# The patch rewrites Cargo.lock's candle-core entry (a path instead of the registry): keep the
# committed lock file as it is.
mkdir -p "$target"
cp Cargo.lock "$target/Cargo.lock.keep"
trap 'cp "$target/Cargo.lock.keep" Cargo.lock' EXIT
patch_arg="patch.crates-io.candle-core.path=\"$patched\""
if [[ "${PEFT_SFT_CUDA_CLIPPY:-0}" == 1 ]]; then
  cargo clippy --release --features cuda --config "$patch_arg" --all-targets -- -D warnings
fi
cargo build --release --features cuda --config "$patch_arg" --bin peft-sft --example bench_lora_step
tests_exe=$(cargo test --release --features cuda --config "$patch_arg" --test gpu --no-run \
  --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[[ -x "$tests_exe" ]] || { echo "error: the gpu test binary was not built" >&2; exit 1; }

# --- the bundle ------------------------------------------------------------------------------------
rm -rf "$bundle"
mkdir -p "$bundle"
pack() { # pack SOURCE NAME: strip, check the libraries it needs, compress
  local src=$1 name=$2
  strip -o "$bundle/$name" "$src"
  if readelf -d "$bundle/$name" | grep NEEDED | grep -Eiq 'cuda|cublas|curand|nvrtc'; then
    echo "error: $name links a CUDA library at start:" >&2
    readelf -d "$bundle/$name" | grep NEEDED >&2
    exit 1
  fi
  xz -6 -T0 -f "$bundle/$name"
}
pack "$target/release/peft-sft" peft-sft
pack "$target/release/examples/bench_lora_step" bench_lora_step
pack "$tests_exe" gpu-tests
# bitsandbytes for the HF side of the side-by-side runs (the GPU machine's image lacks it; the
# wheel's CUDA 11-13 builds are 130 MB, its CUDA 13.0 build 4 MB).
bnb=bitsandbytes==0.50.2
bnb_dir=$cache/bnb
if [[ ! -d $bnb_dir/bitsandbytes ]]; then
  rm -rf "$bnb_dir" && mkdir -p "$bnb_dir"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_24_x86_64 -d "$bnb_dir" "$bnb"
  (cd "$bnb_dir" && python3 -m zipfile -e bitsandbytes-*.whl . && rm bitsandbytes-*.whl)
  find "$bnb_dir/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
fi
tar -cJf "$bundle/bitsandbytes.tar.xz" -C "$bnb_dir" .
git rev-parse HEAD >"$bundle/commit.txt"
git status --porcelain >>"$bundle/commit.txt"

# --- checks that need no GPU -----------------------------------------------------------------------
scratch=$(mktemp -d)
xz -dc "$bundle/peft-sft.xz" >"$scratch/peft-sft" && chmod +x "$scratch/peft-sft"
echo "libraries the CUDA binary needs at start:"
readelf -d "$scratch/peft-sft" | grep NEEDED | sed 's/.*\[/  /; s/\]//'
if ! nvidia-smi >/dev/null 2>&1; then
  "$scratch/peft-sft" generate --model tests/fixtures/models/qwen2 --prompt hi --max-new-tokens 2 \
    --device auto >"$scratch/auto.out" 2>"$scratch/auto.err" || {
    cat "$scratch/auto.err" >&2
    echo "error: --device auto did not fall back to the CPU" >&2
    exit 1
  }
  grep -i "cpu" "$scratch/auto.err" | head -1 | sed 's/^/--device auto here: /'
  if "$scratch/peft-sft" generate --model tests/fixtures/models/qwen2 --prompt hi --max-new-tokens 2 \
    --device cuda >/dev/null 2>"$scratch/cuda.err"; then
    echo "error: --device cuda succeeded on a machine without a GPU" >&2
    exit 1
  fi
  if grep -q "panicked" "$scratch/cuda.err"; then
    cat "$scratch/cuda.err" >&2
    echo "error: --device cuda panicked instead of failing with an error" >&2
    exit 1
  fi
  sed 's/^/--device cuda here: /' "$scratch/cuda.err" | head -3
fi
rm -rf "$scratch"

tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -c -k --files0-from=- 2>/dev/null | tail -1 | cut -f1)
bundle_kib=$(du -s -k "$bundle" | cut -f1)
echo "bundle: $(du -sh "$bundle" | cut -f1) ($(ls "$bundle" | tr '\n' ' '))"
echo "to carry: tree ${tree_kib} KiB + bundle ${bundle_kib} KiB = $(((tree_kib + bundle_kib) / 1024)) MiB of 64"
if ((tree_kib + bundle_kib > 64 * 1024)); then
  echo "error: the tree and the bundle exceed the 64 MiB that travels to the GPU machine" >&2
  exit 1
fi
echo "$bundle"
