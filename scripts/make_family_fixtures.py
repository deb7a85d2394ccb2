#!/usr/bin/env python3
"""Writes the fixtures of the families added after make_reference_fixtures.py (Gemma, Gemma 2, Gemma 3, Phi-3) under
tests/fixtures/ with transformers and PEFT (CPU, f32, eager attention).

Run from the repo root: `python scripts/make_family_fixtures.py`. Deterministic (fixed seeds), no network.

Outputs (small, committed):
  models/{gemma,gemma2,gemma3,phi3}/  tiny random GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (text) and
                                  Phi3ForCausalLM with the chatml test tokenizer; reference.safetensors: input_ids int64
                                  [2,16], logits f32 [2,16,V] (phi3 also input_ids_short [2,8], logits_short: LongRoPE's
                                  short factors; the 16-token inputs pass its original context of 8 and take the long ones)
  models/{mixtral,qwen3_moe}/     tiny mixtures of experts (4 experts, top 2)
  peft/{gemma2,gemma3,phi3,gemma3_multimodal,mixtral,qwen3_moe}/
                                  (MoE: logits, loss and gradients from PEFT in float64 with eager experts)
                                  adapter/ (PEFT LoRA r=4 all-linear, non-zero B), merged/ (merge_and_unload),
                                  reference.safetensors: input_ids, logits, loss (labels = ids, first 5 masked),
                                  merged_logits, grad.<PEFT key> for every LoRA weight

The configs exercise what sets the families apart: `1 + w` norms (weights drawn around 0), √hidden embedding scale,
GeGLU, query_pre_attn_scalar != head_dim, Gemma 2's soft caps set low enough to bend the scores and logits, sliding
windows shorter than the 16-token inputs on alternating (Gemma 2) or patterned (Gemma 3) layers, Gemma 3's q/k norms
and its two RoPE bases (global with linear scaling); Phi-3's fused qkv_proj and gate_up_proj (PEFT adapts them as one
module each), partial_rotary_factor 0.5, LongRoPE and a sliding window.

Versions used are appended to tests/fixtures/VERSIONS.txt by hand (see the "gemma" lines there).
"""
import os
import shutil
import sys
import warnings
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig

OUT = Path("tests/fixtures")
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

GEMMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
             tie_word_embeddings=True)

MODELS = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(**GEMMA, num_hidden_layers=2)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        **GEMMA, num_hidden_layers=3, query_pre_attn_scalar=24, sliding_window=6,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        **GEMMA, num_hidden_layers=4, query_pre_attn_scalar=24, sliding_window=6, sliding_window_pattern=3,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # head_dim 16, rotary width 8 (4 frequencies); original context 8 of 32: attention factor sqrt(1 + ln 4 / ln 8).
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        max_position_embeddings=32, original_max_position_embeddings=8, rms_norm_eps=1e-5, sliding_window=10,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 2.1, 3.4], "long_factor": [1.2, 2.5, 6.0, 11.0],
                         "original_max_position_embeddings": 8})),
    # Mixtures of experts: 4 experts, 2 per token; Mixtral renormalises the top 2 and slides a window of 8; Qwen3-MoE
    # renormalises too (norm_topk_prob), with q/k norms, and its second layer dense (mlp_only_layers).
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1], max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


# Gemma 3's multimodal wrapper (the 4B/12B/27B checkpoints' architecture) around the gemma3 text model above and a
# one-layer vision tower; peft-sft trains its text model, PEFT adapts only `language_model` modules here.
MULTIMODAL = dict(
    # Two text layers (one sliding, one global) keep the fixture small.
    text_config=dict(MODELS["gemma3"][2], vocab_size=400, num_hidden_layers=2, sliding_window_pattern=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=28, patch_size=14),
    mm_tokens_per_image=4, image_token_index=399, boi_token_index=397, eoi_token_index=398)
TEXT_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def randomize(model, offset_norms):
    """Weights far from uniform logits; Gemma's norms scale by 1 + w, so their weights are drawn around 0."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_((0.0 if offset_norms else 1.0) + 0.3 * torch.randn(p.shape, generator=gen))


def ids_for(vocab, seed):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def build(name, tok):
    if name == "gemma3_multimodal":
        config = transformers.Gemma3Config(**MULTIMODAL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
        randomize(model, offset_norms=True)
        return model
    config_cls, model_cls, extra = MODELS[name]
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model, offset_norms=name.startswith("gemma"))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model


def write_models(tok):
    for name in [*MODELS, "gemma3_multimodal"]:
        model = build(name, tok)
        path = OUT / "models" / name
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        ids = ids_for(len(tok), 7)
        with torch.no_grad():
            logits = model(ids).logits.float().contiguous()
        tensors = {"input_ids": ids, "logits": logits}
        if name == "phi3":
            short = ids[:, :8].contiguous()
            with torch.no_grad():
                tensors["input_ids_short"] = short
                tensors["logits_short"] = model(short).logits.float().contiguous()
            # The long factors change the logits where the short ones would have applied.
            assert (tensors["logits_short"] - logits[:, :8]).abs().max() > 1e-3
        save_file(tensors, path / "reference.safetensors")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, logits), name
        print(f"models/{name}: layer_types {getattr(model.config.get_text_config(), 'layer_types', None)}, "
              f"logits std {logits.std():.2f}, max |logit| {logits.abs().max():.2f}")
    check_gemma2_caps_and_window()


def check_gemma2_caps_and_window():
    """The fixture tests what it exercises: without either cap or the window, the logits change."""
    path = OUT / "models" / "gemma2"
    ids = load_file(path / "reference.safetensors")["input_ids"]
    want = load_file(path / "reference.safetensors")["logits"]

    def attn_cap_off(m):
        for layer in m.model.layers:
            layer.self_attn.attn_logit_softcapping = None

    def final_cap_off(m):
        m.config.final_logit_softcapping = None

    def window_off(m):
        m.config.sliding_window = 64  # longer than the input: every layer global

    for what, change in [("attention cap", attn_cap_off), ("final cap", final_cap_off), ("window", window_off)]:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        change(model)
        with torch.no_grad():
            diff = (model(ids).logits - want).abs().max().item()
        print(f"models/gemma2: without the {what} the logits change by {diff:.3f}")
        assert diff > 1e-3, what


def write_peft():
    for name in ["gemma2", "gemma3", "phi3", "gemma3_multimodal", "mixtral", "qwen3_moe"]:
        base = transformers.AutoModelForCausalLM.from_pretrained(OUT / "models" / name, attn_implementation="eager")
        torch.manual_seed(3)
        # MoE: PEFT's all-linear adapts q/k/v/o and, through target_parameters, the router and the stacked experts
        # (gate_up_proj at rank 2r, alpha 2·alpha, which PEFT writes as rank/alpha patterns).
        targets = TEXT_MODULES if name == "gemma3_multimodal" else "all-linear"
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, config)
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.eval()
        path = OUT / "peft" / name
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path / "adapter")
        (path / "adapter" / "README.md").unlink(missing_ok=True)
        ids = ids_for(base.config.get_text_config().vocab_size, 11)
        labels = ids.clone()
        labels[:, :5] = -100
        out = model(ids, labels=labels)
        out.loss.backward()
        tensors = {"input_ids": ids, "logits": out.logits.detach().float().contiguous(),
                   "loss": out.loss.detach().float().reshape(1)}
        for n, p in model.named_parameters():
            if p.requires_grad:
                tensors["grad." + n.replace(".default", "")] = p.grad.detach().contiguous()
        merged = model.merge_and_unload()
        with torch.no_grad():
            tensors["merged_logits"] = merged(ids).logits.float().contiguous()
        merged.save_pretrained(path / "merged", safe_serialization=True)
        if name in ("mixtral", "qwen3_moe"):
            tensors.update(float64_reference(name, path / "adapter", ids, labels))
        save_file(tensors, path / "reference.safetensors")
        grads = sum(1 for k in tensors if k.startswith("grad."))
        print(f"peft/{name}: loss {out.loss.item():.4f}, {grads} LoRA tensors")


def float64_reference(name, adapter, ids, labels):
    """Logits, loss and gradients of the adapter computed in float64 with transformers' eager experts.

    transformers 5 runs a mixture of experts through `grouped_mm` in f32, whose gradients stray ~1e-4 from the exact
    ones (the f64 eager computation agrees with them to ~2e-5 elsewhere); the f64 values are the reference.
    """
    base = transformers.AutoModelForCausalLM.from_pretrained(
        OUT / "models" / name, attn_implementation="eager", experts_implementation="eager", dtype=torch.float64)
    model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True).double()
    out = model(ids, labels=labels)
    out.loss.backward()
    found = {"logits": out.logits.detach().float().contiguous(), "loss": out.loss.detach().float().reshape(1)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            found["grad." + n.replace(".default", "")] = p.grad.float().contiguous()
    return found


def main():
    tok = AutoTokenizer.from_pretrained(OUT / "models" / "qwen2")
    write_models(tok)
    write_peft()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


if __name__ == "__main__":
    main()
