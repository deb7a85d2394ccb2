#!/usr/bin/env python3
"""Writes tests/fixtures/peft/{llama,qwen2}_modules_to_save/: PEFT's `modules_to_save` on the tiny models.

Run from the repo root: `python scripts/make_modules_to_save_fixture.py` (after make_reference_fixtures.py,
whose tiny models and helpers it uses). `LoraConfig(r=4, lora_alpha=8, all-linear, modules_to_save=...)`:
  llama (untied embeddings): modules_to_save=["lm_head", "embed_tokens"]
  qwen2 (tie_word_embeddings): modules_to_save=["lm_head"] — PEFT trains a copy of the tied head alone, so
        the adapted model's head and embedding differ (the merged model is untied)
B set to 0.1 N(0,1) and each trained copy moved by 0.02 N(0,1) (generator seed 99), so the copies show in
the logits. Outputs per model: adapter/ (PEFT saves the copies as `base_model.model.lm_head.weight`,
`base_model.model.model.embed_tokens.weight`), reference.safetensors (input_ids, logits, loss with the first 5
labels -100, `grad.<saved key>` of every trainable tensor, merged_logits of merge_and_unload). Written with
torch 2.15.0, transformers 5.24.0, peft 0.21.2 (Python 3.11).
"""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
import torch
from safetensors.torch import load_file, save_file


def saved_key(param_name):
    return param_name.replace(".modules_to_save.default", "").replace(".default", "")


def main():
    for name, modules in [("llama", ["lm_head", "embed_tokens"]), ("qwen2", ["lm_head"])]:
        path = ref.OUT / "peft" / f"{name}_modules_to_save"
        shutil.rmtree(path, ignore_errors=True)
        base = ref.base_model(name)
        torch.manual_seed(3)
        model = peft.get_peft_model(base, ref.lora_config(modules_to_save=modules))
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif "modules_to_save" in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.eval()
        model.save_pretrained(path / "adapter")
        (path / "adapter" / "README.md").unlink(missing_ok=True)
        ids = ref.ids_for(base.config.vocab_size, 11)
        labels = ids.clone()
        labels[:, :5] = -100
        out = model(ids, labels=labels)
        out.loss.backward()
        tensors = {"input_ids": ids, "logits": out.logits.detach().float().contiguous(),
                   "loss": out.loss.detach().float().reshape(1)}
        for n, p in model.named_parameters():
            if p.requires_grad:
                tensors["grad." + saved_key(n)] = p.grad.detach().contiguous()
        saved = set(load_file(path / "adapter" / "adapter_model.safetensors"))
        grads = {k[len("grad."):] for k in tensors if k.startswith("grad.")}
        assert saved == grads, sorted(saved ^ grads)
        merged = model.merge_and_unload()
        with torch.no_grad():
            tensors["merged_logits"] = merged(ids).logits.float().contiguous()
        err = (tensors["merged_logits"] - tensors["logits"]).abs().max() / tensors["logits"].abs().max()
        assert err < 1e-5, err
        save_file(tensors, path / "reference.safetensors")
        print(f"peft/{name}_modules_to_save: loss {out.loss.item():.4f}, {len(grads)} trainable tensors")


if __name__ == "__main__":
    main()
