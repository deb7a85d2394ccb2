#!/usr/bin/env bash
# Every adapter method peft-sft trains, loaded back by PEFT: for each, `peft-sft train` runs 3 steps on
# the tiny fixture model, `examples/adapter_logits` writes our logits, and scripts/check_peft_loads.py
# loads the adapter with PeftModel.from_pretrained and compares (max relative difference < 1e-4).
# Needs torch, transformers, peft (and bitsandbytes for the QLoRA rows) in python3.
# Usage: bash scripts/check_methods_peft.sh [MODEL_DIR]   (default tests/fixtures/models/llama; any
# fixture family: gemma2, gemma3, phi3 ...)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tests/fixtures/models/llama}
target=${CARGO_TARGET_DIR:-target}
cargo build --quiet --bin peft-sft --example adapter_logits
bin=$target/debug/peft-sft
logits=$target/debug/examples/adapter_logits
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
# name | train flags | base the adapter applies to (default: the model) | --qlora when PEFT loads it in 4 bits
while IFS='|' read -r name flags base quant; do
  [ -z "$name" ] && continue
  out=$work/$name
  # shellcheck disable=SC2086
  "$bin" train --model "$model" --dataset tests/fixtures/data/qa_chat.jsonl --output-dir "$out" \
    --max-steps 3 --per-device-train-batch-size 4 --learning-rate 5e-3 --logging-steps 1 --seed 3 \
    --device cpu --report-to none $flags > "$work/$name.log" 2>&1 || { echo "$name: training failed"; cat "$work/$name.log"; failed=1; continue; }
  b=${base:-$model}
  b=${b//OUT/$out}
  # shellcheck disable=SC2086
  "$logits" "$b" "$out" "$work/$name.safetensors" $quant
  # shellcheck disable=SC2086
  if result=$(python3 scripts/check_peft_loads.py "$b" "$out" "$work/$name.safetensors" $quant 2>/dev/null); then
    echo "$name: ${result##*: }"
  else
    echo "$name: FAILED ${result##*: }"; failed=1
  fi
done <<'ROWS'
lora|--lora||
rslora|--lora --use-rslora||
dora|--lora --use-dora||
qlora|--qlora||--qlora
qlora_dora|--qlora --use-dora||--qlora
loraplus|--lora --loraplus-lr-ratio 16||
gaussian|--lora --init-lora-weights gaussian||
pissa|--lora --init-lora-weights pissa||
olora|--lora --init-lora-weights olora||
loftq|--qlora --init-lora-weights loftq --loftq-iter 2|OUT/loftq_base|
modules_to_save|--lora --modules-to-save embed_tokens,lm_head||
layers|--lora --lora-target-modules o_proj,down_proj --layers-to-transform 1||
exclude|--lora --exclude-modules down_proj||
dft|--lora --loss-type dft||
neftune|--lora --neftune-noise-alpha 5||
ROWS
exit $failed
