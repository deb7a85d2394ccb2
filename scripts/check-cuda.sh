#!/usr/bin/env bash
# Type-checks the CUDA build without a GPU: installs Debian's CUDA toolkit if missing, then runs
# `cargo check --features cuda` with a fixed compute capability. Slow the first time (PTX builds of
# candle's kernels); keep it out of CI and run it before resolving any issue that touches device code.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  if ! grep -qs "contrib" /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; then
    sed -i 's/^Components: main$/Components: main contrib non-free non-free-firmware/' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true
    sed -i 's/ main$/ main contrib non-free/' /etc/apt/sources.list 2>/dev/null || true
  fi
  apt-get update -q
  apt-get install -y -q nvidia-cuda-toolkit
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}"
cargo check --features cuda --all-targets
