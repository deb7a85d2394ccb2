#!/usr/bin/env python3
"""Checks that an adapter written by peft-sft loads in PEFT and gives the same logits as peft-sft.

Usage: python scripts/check_peft_loads.py BASE_MODEL_DIR ADAPTER_DIR LOGITS.safetensors [--qlora]
where LOGITS.safetensors holds `input_ids` and peft-sft's `logits` for them
(`cargo run --example adapter_logits -- BASE ADAPTER OUT.safetensors [--qlora]` writes it).
With --qlora the base loads through bitsandbytes (NF4, double quantization, f32 compute) as QLoRA
training used it.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, logits_path = sys.argv[1:4]
qlora = "--qlora" in sys.argv[4:]
ref = load_file(logits_path)
extra = {}
if qlora:
    from transformers import BitsAndBytesConfig

    extra = dict(device_map="cpu", dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", **extra)
if qlora:
    import bitsandbytes as bnb

    # On a CPU with AVX512-BF16, bitsandbytes >= 0.49 repacks 4-bit weights for a bf16 inference kernel
    # (2e-2 from f32); QLoRA training computes in f32: keep bitsandbytes' dequantize + f32 matmul.
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, adapter_dir).eval()
with torch.no_grad():
    logits = model(ref["input_ids"].long()).logits
err = ((logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
print(f"PeftModel.from_pretrained loaded {adapter_dir}; max relative logit difference vs peft-sft: {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
