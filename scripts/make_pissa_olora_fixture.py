#!/usr/bin/env python3
"""Writes tests/fixtures/peft/llama_{pissa,olora}/: PEFT's PiSSA and OLoRA initialisations on the tiny Llama.

Run from the repo root: `python scripts/make_pissa_olora_fixture.py` (after make_reference_fixtures.py, whose
tiny Llama and helpers it uses). For init_lora_weights "pissa" and "olora" (`LoraConfig(r=4, lora_alpha=8,
all-linear)`):
  reference.safetensors
    init.<saved key>         A and B as PEFT initialised them (each component's sign is free)
    residual.<module>.weight the base weight PEFT leaves: W - scale * B0 A0
    input_ids, logits_init   the adapted model at initialisation (equal to the base model's)
    logits, loss, grad.<saved key>  after A and B moved by 0.05 N(0,1) (generator seed 7), labels -100
                             on the first 5 positions
    converted_logits         PeftModel.from_pretrained(original base, converted/) on the same ids
  converted/                 the moved adapter saved relative to the original base, as PEFT's
                             save_pretrained(path_initial_model_for_weight_conversion=...) writes it
Written with torch 2.15.0, transformers 5.24.0, peft 0.21.2 (Python 3.11).
"""
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import peft
import torch
from safetensors.torch import save_file


def main():
    for init in ["pissa", "olora"]:
        path = ref.OUT / "peft" / f"llama_{init}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        base = ref.base_model("llama")
        ids = ref.ids_for(base.config.vocab_size, 11)
        model = peft.get_peft_model(base, ref.lora_config(init_lora_weights=init))
        model.eval()
        tensors = {"input_ids": ids}
        for n, p in model.named_parameters():
            if "lora_" in n:
                tensors["init." + ref.peft_key(n)] = p.detach().clone().contiguous()
            elif n.endswith("base_layer.weight"):
                module = n.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
                tensors[f"residual.{module}.weight"] = p.detach().clone().contiguous()
        with torch.no_grad():
            tensors["logits_init"] = model(ids).logits.float().contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            # PEFT's recipe: the initial adapter saved with init_lora_weights=True before training.
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(Path(tmp) / "initial")
            model.peft_config["default"].init_lora_weights = init
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            labels = ids.clone()
            labels[:, :5] = -100
            out = model(ids, labels=labels)
            out.loss.backward()
            tensors["logits"] = out.logits.detach().float().contiguous()
            tensors["loss"] = out.loss.detach().float().reshape(1)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    tensors["moved." + ref.peft_key(n)] = p.detach().clone().contiguous()
                    tensors["grad." + ref.peft_key(n)] = p.grad.detach().contiguous()
            model.save_pretrained(path / "converted",
                                  path_initial_model_for_weight_conversion=str(Path(tmp) / "initial"))
        (path / "converted" / "README.md").unlink(missing_ok=True)
        original = peft.PeftModel.from_pretrained(ref.base_model("llama"), path / "converted").eval()
        with torch.no_grad():
            tensors["converted_logits"] = original(ids).logits.float().contiguous()
        err = (tensors["converted_logits"] - tensors["logits"]).abs().max() / tensors["logits"].abs().max()
        assert err < 1e-4, err
        save_file(tensors, path / "reference.safetensors")
        print(f"peft/llama_{init}: loss {out.loss.item():.4f}; converted adapter on the original base: {err:.1e}")


if __name__ == "__main__":
    main()
