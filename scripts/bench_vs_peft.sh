#!/usr/bin/env bash
# Side by side on this machine, in one invocation: a LoRA SFT step (r=16, all-linear, f32, batch 1)
# on the same random SmolLM2-135M-shaped model, in HF transformers + PEFT and in peft-sft.
#   scripts/bench_vs_peft.sh [SEQ_LEN...]        (default: 512)
#   ROUNDS=N (default 1): the three runs repeated N times, interleaved, each stack's best
#   tokens/s kept (the machine's speed drifts by up to ±25% within minutes, for both stacks).
#   Peak RSS: the largest of peft-sft's rounds against the smallest of PEFT's (barely moves).
# Needs: pip install torch transformers peft. Prints one JSON line per run and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/peft-sft-bench}"
MODEL="$BENCH_DIR/smollm2-135m-random"
STEPS="${STEPS:-3}"
ROUNDS="${ROUNDS:-1}"
[ -f "$MODEL/config.json" ] || python3 scripts/bench_peft.py --make-model "$MODEL"
cargo build --release --example bench_lora_step -q
for T in "${@:-512}"; do
  runs=()
  for _ in $(seq "$ROUNDS"); do
    peft=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" 2>/dev/null | tail -1)
    peft_gc=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" --gradient-checkpointing 2>/dev/null | tail -1)
    ours=$(target/release/examples/bench_lora_step "$MODEL" "$T" "$STEPS" 16)
    echo "$peft"; echo "$peft_gc"; echo "$ours"
    runs+=("$peft" "$peft_gc" "$ours")
  done
  python3 - "${runs[@]}" <<'PY'
import json, sys
runs = [json.loads(a) for a in sys.argv[1:]]
peft = [r for r in runs if r["impl"].startswith("peft") and not r["impl"].startswith("peft-sft")]
ours = [r for r in runs if r["impl"].startswith("peft-sft")]
fastest = max(r["tokens_per_second"] for r in peft)
leanest = min(r["peak_rss_mib"] for r in peft)
speed = max(r["tokens_per_second"] for r in ours)
rss = max(r["peak_rss_mib"] for r in ours)
print(f"T={ours[0]['seq_len']} ({len(ours)} round(s)): peft-sft {speed:.1f} tok/s, {rss:.0f} MiB | "
      f"PEFT fastest {fastest:.1f} tok/s, leanest {leanest:.0f} MiB | "
      f"speed ratio {speed / fastest:.2f}x, RSS ratio {rss / leanest:.2f}x")
PY
done
