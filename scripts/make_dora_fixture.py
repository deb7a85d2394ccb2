#!/usr/bin/env python3
"""Writes tests/fixtures/peft/llama_dora/: PEFT's DoRA on the tiny Llama, dense and over bitsandbytes NF4.

Run from the repo root: `python scripts/make_dora_fixture.py` (after make_reference_fixtures.py and
make_qlora_fixtures.py, whose tiny Llama, helpers and pre-quantized `qlora/bnb_llama` it reads).
`LoraConfig(r=4, lora_alpha=8, all-linear, use_dora=True)`, B and the magnitude vectors moved off their
initial values (B ~ 0.1 N(0,1), magnitude scaled by 1 + 0.1 N(0,1)) so every term of DoRA shows in the
logits and gradients. Outputs:
  adapter/                   the adapter as PEFT saves it (`lora_magnitude_vector` keys)
  reference.safetensors      input_ids; logits, loss (labels -100 on the first 5 positions) and
                             `grad.<saved key>` of every trainable tensor; merged_logits (merge_and_unload)
  merged/model.safetensors   merge_and_unload's weights
  qlora_reference.safetensors  the same adapter over qlora/bnb_llama's NF4 weights: logits, loss, gradients,
                             computed by PEFT on a plain f32 Llama holding the dequantized weights. (PEFT over
                             the bitsandbytes model itself is wrong on the CPU with bitsandbytes 0.50.2: its
                             first forward repacks the 4-bit weight for its CPU kernel, after which PEFT's
                             `dequantize_module_weight` returns other values; on a GPU a Linear4bit computes
                             F.linear(x, dequantize(W)), which is what this reference computes.)
Written with torch 2.15.0, transformers 5.24.0, peft 0.21.2, numpy's NF4 reference (Python 3.11).
"""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import make_qlora_fixtures as qlora  # its numpy NF4 dequantization (needs the `gguf` package)
import peft
import torch
from safetensors.torch import load_file, save_file


def saved_key(param_name):
    """In-memory name -> the key PEFT saves (`lora_magnitude_vector.default.weight` -> `lora_magnitude_vector`)."""
    return param_name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(
        ".default", "")


def step(model, ids):
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    tensors = {"logits": out.logits.detach().float().contiguous(), "loss": out.loss.detach().float().reshape(1)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + saved_key(n)] = p.grad.detach().contiguous()
    return out, tensors


def main():
    path = ref.OUT / "peft" / "llama_dora"
    shutil.rmtree(path, ignore_errors=True)
    base = ref.base_model("llama")
    torch.manual_seed(3)
    model = peft.get_peft_model(base, ref.lora_config(use_dora=True))
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(path / "adapter")
    (path / "adapter" / "README.md").unlink(missing_ok=True)
    ids = ref.ids_for(base.config.vocab_size, 11)
    out, tensors = step(model, ids)
    tensors["input_ids"] = ids
    saved = set(load_file(path / "adapter" / "adapter_model.safetensors"))
    grads = {k[len("grad."):] for k in tensors if k.startswith("grad.")}
    assert saved == grads, sorted(saved ^ grads)
    assert sum("magnitude" in k for k in grads) == 14
    merged = model.merge_and_unload()
    with torch.no_grad():
        tensors["merged_logits"] = merged(ids).logits.float().contiguous()
    err = (tensors["merged_logits"] - tensors["logits"]).abs().max() / tensors["logits"].abs().max()
    assert err < 1e-5, err
    merged.save_pretrained(path / "merged", safe_serialization=True)
    save_file(tensors, path / "reference.safetensors")
    print(f"peft/llama_dora: loss {out.loss.item():.4f}, {len(grads)} trainable tensors, merge err {err:.1e}")

    # The same adapter over the NF4 checkpoint's dequantized weights.
    st = load_file(ref.OUT / "qlora" / "bnb_llama" / "model.safetensors")
    plain = ref.base_model("llama")
    with torch.no_grad():
        for k, v in plain.state_dict().items():
            if k + ".quant_state.bitsandbytes__nf4" in st:
                v.copy_(qlora.ref_dequant_checkpoint(st, k))
    qmodel = peft.PeftModel.from_pretrained(plain, path / "adapter", is_trainable=True)
    qmodel.eval()
    qout, qtensors = step(qmodel, ids)
    qtensors["input_ids"] = ids
    assert {k for k in qtensors if k.startswith("grad.")} == {"grad." + k for k in grads}
    save_file(qtensors, path / "qlora_reference.safetensors")
    print(f"peft/llama_dora over NF4: loss {qout.loss.item():.4f}")


if __name__ == "__main__":
    main()
