#!/usr/bin/env bash
# Side by side on this machine, in one invocation: a LoRA SFT step (r=16, all-linear, f32, batch 1)
# on the same random SmolLM2-135M-shaped model, in HF transformers + PEFT and in peft-sft.
#   scripts/bench_vs_peft.sh [SEQ_LEN...]        (default: 512)
# Needs: pip install torch transformers peft. Prints one JSON line per run and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/peft-sft-bench}"
MODEL="$BENCH_DIR/smollm2-135m-random"
STEPS="${STEPS:-3}"
[ -f "$MODEL/config.json" ] || python3 scripts/bench_peft.py --make-model "$MODEL"
cargo build --release --example bench_lora_step -q
for T in "${@:-512}"; do
  peft=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" 2>/dev/null | tail -1)
  peft_gc=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" --gradient-checkpointing 2>/dev/null | tail -1)
  ours=$(target/release/examples/bench_lora_step "$MODEL" "$T" "$STEPS" 16)
  echo "$peft"; echo "$peft_gc"; echo "$ours"
  python3 - "$peft" "$peft_gc" "$ours" <<'PY'
import json, sys
peft, peft_gc, ours = (json.loads(a) for a in sys.argv[1:4])
fastest = max(peft["tokens_per_second"], peft_gc["tokens_per_second"])
leanest = min(peft["peak_rss_mib"], peft_gc["peak_rss_mib"])
print(f"T={ours['seq_len']}: peft-sft {ours['tokens_per_second']:.1f} tok/s, {ours['peak_rss_mib']:.0f} MiB | "
      f"PEFT fastest {fastest:.1f} tok/s, leanest {leanest:.0f} MiB | "
      f"speed ratio {ours['tokens_per_second'] / fastest:.2f}x, RSS ratio {ours['peak_rss_mib'] / leanest:.2f}x")
PY
done
