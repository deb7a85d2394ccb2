#!/usr/bin/env python3
"""Writes tests/fixtures/peft/llama/dft_reference.safetensors: TRL's DFT loss and its LoRA gradients.

Run from the repo root: `python scripts/make_dft_fixture.py` (after make_reference_fixtures.py, whose tiny
Llama, PEFT adapter and input ids it reads). The loss is TRL 1.16 SFTTrainer.compute_loss's with
`loss_type="dft"`: per-token `-log p * p.detach()` (zero on positions labelled -100), summed and divided by the
number of label tokens; labels are the inputs with the first 5 positions -100, as reference.safetensors'.
Outputs: `loss` [1] and `grad.<PEFT key>` for every LoRA weight. Written with torch 2.15.0,
transformers 5.24.0, peft 0.21.2 (Python 3.11).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
import torch
from safetensors.torch import load_file, save_file


def main():
    path = ref.OUT / "peft" / "llama"
    base = ref.base_model("llama")
    model = peft.PeftModel.from_pretrained(base, path / "adapter", is_trainable=True)
    ids = load_file(path / "reference.safetensors")["input_ids"]
    labels = ids.clone()
    labels[:, :5] = -100
    logits = model(ids).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    log_probs = torch.log_softmax(shift_logits, dim=-1)
    log_probs = log_probs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    per_token_loss = -log_probs * log_probs.exp().detach()  # TRL: DFT, https://huggingface.co/papers/2508.05629
    loss = per_token_loss.sum() / mask.sum().clamp(min=1)
    loss.backward()
    tensors = {"loss": loss.detach().float().reshape(1)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + ref.peft_key(n)] = p.grad.detach().contiguous()
    save_file(tensors, path / "dft_reference.safetensors")
    print(f"peft/llama DFT: loss {loss.item():.6f}, {len(tensors) - 1} LoRA gradients")


if __name__ == "__main__":
    main()
