#!/usr/bin/env bash
# Side by side on this machine, in one invocation: a LoRA SFT step (r=16, all-linear, f32, batch 1)
# on the same random SmolLM2-135M-shaped model, in HF transformers + PEFT and in peft-sft.
#   scripts/bench_vs_peft.sh [SEQ_LEN...]        (default: 512)
#   ROUNDS=N (default 1): the three runs repeated N times, interleaved (the machine's speed
#   drifts by up to ±25% within minutes, for both stacks). The summary compares medians over the
#   rounds: ours against the faster PEFT variant's tokens/s and the leaner variant's peak RSS.
#   BENCH_BIN: a bench_lora_step binary to run instead of building this checkout's (old/new A/B).
#   GC=1: gradient checkpointing on both sides (ours `+gc` and `--gradient-checkpointing`; PEFT's
#   checkpointed variant only — without it PEFT's eager attention at long lengths does not fit).
#   CLI=1: also time the same step through `peft-sft train` (what users run): wall time of a run of
#   STEPS+3 steps less one of 3 steps, over STEPS steps, on text rows of at least SEQ_LEN tokens (the
#   test fixture's small tokenizer on the random model; --max-length SEQ_LEN, batch 1, no dropout);
#   peak RSS from the longer run. PEFT_SFT_BIN: the CLI binary (default: this checkout's release).
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
if [ "${CLI:-0}" = 1 ]; then
  if [ -z "${PEFT_SFT_BIN:-}" ]; then
    cargo build --release -q
    PEFT_SFT_BIN="${CARGO_TARGET_DIR:-target}/release/peft-sft"
  fi
  CLI_MODEL="$BENCH_DIR/smollm2-135m-random-cli"
  mkdir -p "$CLI_MODEL"
  for f in config.json generation_config.json model.safetensors; do ln -sf "$MODEL/$f" "$CLI_MODEL/$f"; done
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json; do cp tests/fixtures/models/qwen2/$f "$CLI_MODEL/"; done
  CLI_DATA="$BENCH_DIR/long_text.jsonl"
  python3 -c "
import json, random
random.seed(0)
words = 'the of and to in is was for on that with as by at from his her it an were are which this be or has had not but'.split()
with open('$CLI_DATA', 'w') as f:
    for _ in range(64):
        f.write(json.dumps({'text': ' '.join(random.choice(words) for _ in range(12000))}) + '\\n')
"
fi
# One `peft-sft train` run of $2 steps at length $1: prints "seconds peak_rss_mib".
cli_run() {
  local out; out=$(mktemp -d)
  /usr/bin/time -f "%e %M" -o "$out/time" "$PEFT_SFT_BIN" train --model "$CLI_MODEL" --dataset "$CLI_DATA" \
    --output-dir "$out/run" --max-length "$1" --max-steps "$2" --per-device-train-batch-size 1 \
    --lora-r 16 --lora-alpha 32 --lora-dropout 0 --learning-rate 1e-4 --logging-steps 1 \
    --save-steps 100000 --device cpu ${GC_FLAG:-} > /dev/null 2>&1
  awk '{printf "%s %.1f\n", $1, $2 / 1024}' "$out/time"
  rm -rf "$out"
}
OURS_MODE=lora
if [ "${GC:-0}" = 1 ]; then OURS_MODE=lora+gc; GC_FLAG=--gradient-checkpointing; fi
for T in "${@:-512}"; do
  runs=()
  for _ in $(seq "$ROUNDS"); do
    if [ "${GC:-0}" != 1 ]; then
      peft=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" 2>/dev/null | tail -1)
      echo "$peft"; runs+=("$peft")
    fi
    peft_gc=$(python3 scripts/bench_peft.py --model "$MODEL" --seq-len "$T" --steps "$((STEPS + 1))" --gradient-checkpointing 2>/dev/null | tail -1)
    ours=$("$BENCH_BIN" "$MODEL" "$T" "$STEPS" 16 "$OURS_MODE")
    echo "$peft_gc"; echo "$ours"
    runs+=("$peft_gc" "$ours")
    if [ "${CLI:-0}" = 1 ]; then
      read -r short _ < <(cli_run "$T" 3)
      read -r long rss < <(cli_run "$T" "$((STEPS + 3))")
      cli=$(python3 -c "import json; s=($long - $short) / $STEPS; print(json.dumps({'impl': 'peft-sft-cli train', 'seq_len': $T, 'step_seconds': s, 'tokens_per_second': $T / s, 'peak_rss_mib': $rss}))")
      echo "$cli"
      runs+=("$cli")
    fi
  done
  python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
def median(rs, key):
    return statistics.median(r[key] for r in rs)
ours = [r for r in runs if r["impl"].startswith("peft-sft") and "cli" not in r["impl"]]
cli = [r for r in runs if "cli" in r["impl"]]
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
print(f"  best round: peft-sft {max(r['tokens_per_second'] for r in ours):.1f} tok/s")
# Each round against that round's faster PEFT variant (runs are interleaved: same machine state).
n_rounds = len(ours)
per_round = []
for i in range(n_rounds):
    peft_i = max(rs[i]["tokens_per_second"] for rs in variants.values() if len(rs) > i)
    per_round.append((ours[i]["tokens_per_second"] / peft_i,
                      cli[i]["tokens_per_second"] / peft_i if i < len(cli) else None))
print("  per-round speed ratios vs that round's faster PEFT: step "
      + " / ".join(f"{a:.2f}x" for a, _ in per_round)
      + ("; CLI " + " / ".join(f"{b:.2f}x" for _, b in per_round if b is not None) if cli else ""))
if cli:
    cs, cr = median(cli, "tokens_per_second"), median(cli, "peak_rss_mib")
    cli_rounds = " / ".join(f"{r['tokens_per_second']:.1f}" for r in cli)
    print(f"  peft-sft train (CLI): {cs:.1f} tok/s (rounds {cli_rounds}; best "
          f"{max(r['tokens_per_second'] for r in cli):.1f}), {cr:.0f} MiB | "
          f"{cs / speed:.2f}x the step benchmark | vs PEFT {cs / fastest:.2f}x speed, {cr / leanest:.2f}x RSS")
PY
done
