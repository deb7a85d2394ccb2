#!/usr/bin/env python3
"""Writes tests/fixtures/train/llama_loraplus/: three steps of PEFT's LoRA+ optimizer on the tiny Llama.

Run from the repo root: `python scripts/make_loraplus_fixture.py` (after make_reference_fixtures.py, whose
tiny models and helpers it uses). Like that script's train/llama_adamw, but the optimizer is
`peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
loraplus_weight_decay=0.01)`: lora_B at 16x the learning rate, decay 0.01 on every group (PEFT ignores the
optimizer's own `weight_decay` for these groups). Outputs: initial_adapter/, batch.safetensors, steps.json
(loss, pre-clip grad_norm per step), final_adapter/. Written with torch 2.15.0, transformers 5.24.0,
peft 0.21.2 (Python 3.11).
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import save_file


def main():
    path = ref.OUT / "train" / "llama_loraplus"
    shutil.rmtree(path, ignore_errors=True)
    base = ref.base_model("llama")
    torch.manual_seed(5)
    model = peft.get_peft_model(base, ref.lora_config())
    # A non-zero B, so the first step moves A too and both groups' rates show.
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(path / "initial_adapter")
    ids = ref.ids_for(base.config.vocab_size, 13)
    labels = ids.clone()
    labels[:, :5] = -100
    save_file({"input_ids": ids, "labels": labels}, path / "batch.safetensors")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                    loraplus_weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    steps = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps.append({"loss": loss.item(), "grad_norm": norm.item()})
    (path / "steps.json").write_text(json.dumps(steps, indent=1) + "\n")
    model.save_pretrained(path / "final_adapter")
    for sub in ("initial_adapter", "final_adapter"):
        (path / sub / "README.md").unlink(missing_ok=True)
    print(f"train/llama_loraplus: {steps}")


if __name__ == "__main__":
    main()
