#!/usr/bin/env bash
# Side by side on this machine, in one invocation: a LoRA SFT step (r=16, all-linear, f32, batch 1)
# on the same random SmolLM2-135M-shaped model, in HF transformers + PEFT and in peft-sft.
#   scripts/bench_vs_peft.sh [SEQ_LEN...]        (default: 512)
#   ROUNDS=N (default 1): the three runs repeated N times, interleaved (the machine's speed
#   drifts by up to ±25% within minutes, for both stacks). The summary compares medians over the
#   rounds: ours against the faster PEFT variant's tokens/s and the leaner variant's peak RSS.
#   BENCH_BIN: a bench_lora_step binary to run instead of building this checkout's (old/new A/B).
# Needs: pip install torch transformers peft. Prints one JSON line per run and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/peft-sft-bench}"
MODEL="$BENCH_DIR/smollm2-135m-random"
STEPS="${STEPS:-3}"
ROUNDS="${ROUNDS:-1}"
[ -f "$MODEL/config.json" ] || python3 scripts/bench_peft.py --make-model "$MODEL"
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release --example bench_lora_step -q
  BENCH_BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench_lora_step"
fi
for T in "${@:-512}"; do
  runs=()
  for _ in $(seq "$ROUNDS"); do
    peft=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" 2>/dev/null | tail -1)
    peft_gc=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" --gradient-checkpointing 2>/dev/null | tail -1)
    ours=$("$BENCH_BIN" "$MODEL" "$T" "$STEPS" 16)
    echo "$peft"; echo "$peft_gc"; echo "$ours"
    runs+=("$peft" "$peft_gc" "$ours")
  done
  python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
def median(rs, key):
    return statistics.median(r[key] for r in rs)
ours = [r for r in runs if r["impl"].startswith("peft-sft")]
variants = {}
for r in runs:
    if not r["impl"].startswith("peft-sft"):
        variants.setdefault(r["impl"], []).append(r)
speed, rss = median(ours, "tokens_per_second"), median(ours, "peak_rss_mib")
fastest = max(median(rs, "tokens_per_second") for rs in variants.values())
leanest = min(median(rs, "peak_rss_mib") for rs in variants.values())
rounds = " / ".join(f"{r['tokens_per_second']:.1f}" for r in ours)
print(f"T={ours[0]['seq_len']} ({len(ours)} round(s), medians): peft-sft {speed:.1f} tok/s "
      f"(rounds {rounds}), {rss:.0f} MiB | PEFT faster variant {fastest:.1f} tok/s, leaner "
      f"variant {leanest:.0f} MiB | speed ratio {speed / fastest:.2f}x, RSS ratio {rss / leanest:.2f}x")
PY
done
