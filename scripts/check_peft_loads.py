#!/usr/bin/env python3
"""Checks that an adapter written by peft-sft loads in PEFT and gives the same logits as peft-sft.

Usage: python scripts/check_peft_loads.py BASE_MODEL_DIR ADAPTER_DIR LOGITS.safetensors
where LOGITS.safetensors holds `input_ids` and peft-sft's `logits` for them
(`cargo run --example adapter_logits -- BASE ADAPTER OUT.safetensors` writes it).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, logits_path = sys.argv[1:4]
ref = load_file(logits_path)
base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter_dir).eval()
with torch.no_grad():
    logits = model(ref["input_ids"].long()).logits
err = ((logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
print(f"PeftModel.from_pretrained loaded {adapter_dir}; max relative logit difference vs peft-sft: {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
