#!/usr/bin/env python3
"""Writes tests/fixtures/peft/llama_loftq/: PEFT's LoftQ initialisation on the tiny Llama.

Run from the repo root: `python scripts/make_loftq_fixture.py` (after make_reference_fixtures.py, whose
tiny Llama and helpers it uses). PEFT 0.21's `loftq_init` runs its arithmetic on "cuda" (or "xpu")
unconditionally; this script executes PEFT's own function with that one device name replaced by "cpu"
(bitsandbytes 0.50 quantizes on the CPU), nothing else changed. For `LoraConfig(r=4, lora_alpha=8,
all-linear, init_lora_weights="loftq")` and each LoftQConfig in CASES:
  reference.safetensors
    <case>.init.<saved key>         A and B as LoftQ initialised them (each component's sign is free)
    <case>.base.<module>.weight     the base weight LoftQ leaves: the dequantized quantization of
                                    W - B A of the previous iteration (of W in the first)
    <case>.logits_init              the adapted model at initialisation
    input_ids
Written with torch 2.15.0, transformers 5.24.0, peft 0.21.2, bitsandbytes 0.50.2, scipy 1.17.1 (PEFT checks
for it) (Python 3.11).
"""
import inspect
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
import peft.tuners.lora.layer as lora_layer
import peft.utils.loftq_utils as loftq_utils
import torch
from safetensors.torch import save_file

CASES = {"nf4_iter1": (4, 1), "nf4_iter2": (4, 2), "int8_iter1": (8, 1)}


def loftq_on_cpu():
    """PEFT's loftq_init, computing on the CPU."""
    src = inspect.getsource(loftq_utils.loftq_init)
    device_choice = '"xpu" if is_xpu_available() else "cuda"'
    assert src.count(device_choice) == 1, "PEFT's loftq_init changed: review this script"
    namespace = dict(vars(loftq_utils))
    exec(src.replace(device_choice, '"cpu"'), namespace)
    return namespace["loftq_init"]


def main():
    lora_layer.loftq_init = loftq_on_cpu()
    path = ref.OUT / "peft" / "llama_loftq"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    ids = ref.ids_for(400, 11)
    tensors = {"input_ids": ids}
    for case, (bits, iters) in CASES.items():
        base = ref.base_model("llama")
        config = ref.lora_config(init_lora_weights="loftq",
                                 loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
        model = peft.get_peft_model(base, config).eval()
        for n, p in model.named_parameters():
            if "lora_" in n:
                tensors[f"{case}.init." + ref.peft_key(n)] = p.detach().clone().contiguous()
            elif n.endswith("base_layer.weight"):
                module = n.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
                tensors[f"{case}.base.{module}.weight"] = p.detach().clone().contiguous()
        with torch.no_grad():
            tensors[f"{case}.logits_init"] = model(ids).logits.float().contiguous()
        print(f"peft/llama_loftq {case}: {sum(1 for k in tensors if k.startswith(case + '.base.'))} modules")
    save_file(tensors, path / "reference.safetensors")


if __name__ == "__main__":
    main()
