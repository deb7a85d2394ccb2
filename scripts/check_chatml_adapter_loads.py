#!/usr/bin/env python3
"""Checks that an adapter trained by peft-sft with `--chat-template chatml` on a base model without ChatML tokens
loads in PEFT the way a user loads it, and gives the same logits as peft-sft.

Usage: python scripts/check_chatml_adapter_loads.py BASE_MODEL_DIR ADAPTER_DIR LOGITS.safetensors [--auto]
where LOGITS.safetensors holds `input_ids` (int64 or uint32, [B, T]) and peft-sft's `logits` ([B, T, V], V = the
resized vocabulary), the layout of tests/fixtures/chatml_setup/expected.safetensors.

The user's flow (PEFT does not resize the base itself):
    tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)        # the tokenizer with <|im_start|>/<|im_end|>
    base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    base.resize_token_embeddings(len(tokenizer))                  # new rows: any values, the adapter replaces them
    model = PeftModel.from_pretrained(base, ADAPTER_DIR)
With --auto it also runs `AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)`, which does the resize itself
when ADAPTER_DIR holds tokenizer_config.json (it loads the base from adapter_config.json's
`base_model_name_or_path`, so that path must resolve from the current directory).
Exits non-zero when the max relative logit difference is above 1e-4.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4
base_dir, adapter_dir, logits_path = sys.argv[1:4]
auto = "--auto" in sys.argv[4:]
ref = load_file(logits_path)
ids, want = ref["input_ids"].long(), ref["logits"].float()
config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())

# The vocabulary the adapter was trained with: the adapter's tokenizer, else the logits' last dimension.
if (Path(adapter_dir) / "tokenizer_config.json").exists():
    vocab = len(AutoTokenizer.from_pretrained(adapter_dir))
    source = "the adapter's tokenizer"
else:
    vocab = want.shape[-1]
    source = "the logits (no tokenizer in the adapter folder)"
if vocab != want.shape[-1]:
    print(f"vocabulary of {source} is {vocab}, the logits have {want.shape[-1]} columns")
    sys.exit(1)

keys = sorted(load_file(Path(adapter_dir) / "adapter_model.safetensors"))
extra = [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]
print(f"adapter: {len(keys) - len(extra)} LoRA tensors; trainable_token_indices="
      f"{config.get('trainable_token_indices')}, modules_to_save={config.get('modules_to_save')}; other tensors:")
for k in extra:
    print(f"  {k}")


def relerr(model):
    with torch.no_grad():
        got = model(ids).logits.float()
    if got.shape != want.shape:
        print(f"logits shape {tuple(got.shape)} != {tuple(want.shape)}")
        sys.exit(1)
    return ((got - want).abs().max() / want.abs().max()).item()


base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
old = base.get_input_embeddings().weight.shape[0]
if vocab > old:
    base.resize_token_embeddings(vocab, mean_resizing=False)
print(f"base {base_dir}: vocabulary {old} -> {vocab} ({source})")
errors = {"resize + PeftModel.from_pretrained": relerr(PeftModel.from_pretrained(base, adapter_dir).eval())}
if auto:
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, attn_implementation="eager", dtype=torch.float32)
    errors["AutoPeftModelForCausalLM.from_pretrained"] = relerr(model.eval())
ok = True
for name, err in errors.items():
    print(f"{name}: max relative logit difference vs peft-sft: {err:.2e}")
    ok &= err < TOL
sys.exit(0 if ok else 1)
