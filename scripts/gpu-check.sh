#!/usr/bin/env bash
# The GPU checks: runs on the GPU machine, from the repository root, with the bundle that
# scripts/gpu-build.sh made here (folder gpu-bundle/, ignored by git, carried along). One command,
# under 8 minutes; writes $OUT/gpu-report.json, $OUT/tests.log and $OUT/bench.log; exits non-zero
# when any section failed. Through the device tool:
#
#   run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"], timeout_s=560)
#
# What it checks is listed in scripts/gpu_check.py. GPU_CHECK_ONLY=env,tests,side,fit16 picks
# sections; GPU_CHECK_BUDGET_S (default 470) is the time the sections may take together.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
export OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/peft-sft-gpu.XXXX)
export PEFT_SFT_GPU_WORK=$work
for f in peft-sft bench_lora_step gpu-tests; do
  [[ -f $bundle/$f.xz ]] || { echo "error: $bundle/$f.xz missing: run scripts/gpu-build.sh here and carry gpu-bundle" >&2; exit 2; }
  xz -dc "$bundle/$f.xz" >"$work/$f" && chmod +x "$work/$f"
done
cp "$bundle/commit.txt" "$work/" 2>/dev/null || true
# bitsandbytes for the HF side's QLoRA (not in the machine's image): its CUDA 13.0 build only.
if [[ -f $bundle/bitsandbytes.tar.xz ]]; then
  mkdir -p "$work/site"
  tar -xJf "$bundle/bitsandbytes.tar.xz" -C "$work/site"
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The CUDA 13 libraries are pip packages of the machine's python (nvidia/cu13/lib and friends):
# the binaries load them at run time, so they go on LD_LIBRARY_PATH.
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
libdirs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 scripts/gpu_check.py 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
