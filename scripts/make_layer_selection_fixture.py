#!/usr/bin/env python3
"""Writes tests/fixtures/peft/layer_selection.json: which modules PEFT adapts under layer selection.

Run from the repo root: `python scripts/make_layer_selection_fixture.py` (after make_reference_fixtures.py,
whose tiny 2-layer Llama it reads). For each LoraConfig below (`layers_to_transform`, `layers_pattern`,
`exclude_modules` with list and regex targets), the sorted names of the modules `peft.get_peft_model`
wrapped in a LoRA layer. Written with torch 2.15.0, transformers 5.24.0, peft 0.21.2 (Python 3.11).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
from peft.tuners.lora import LoraLayer

CASES = [
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["self_attn.o_proj", "gate_proj"], "layers_to_transform": [0, 1],
     "exclude_modules": ["model.layers.0.mlp.gate_proj"]},
    {"target_modules": "all-linear", "exclude_modules": ["down_proj", "lm_head"]},
    {"target_modules": "all-linear", "exclude_modules": r".*\.1\.self_attn\..*"},
    {"target_modules": r".*\.(q|k)_proj", "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
]


def main():
    out = []
    for case in CASES:
        model = peft.get_peft_model(ref.base_model("llama"), peft.LoraConfig(r=4, task_type="CAUSAL_LM", **case))
        inner = model.base_model.model
        names = sorted(n for n, m in inner.named_modules() if isinstance(m, LoraLayer))
        out.append({"config": case, "modules": names})
        print(f"{json.dumps(case)}: {len(names)} modules")
    path = ref.OUT / "peft" / "layer_selection.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
