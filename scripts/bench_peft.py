#!/usr/bin/env python3
"""HF transformers + PEFT reference for a LoRA SFT step (forward, backward, clip, AdamW) on CPU, f32, batch 1.

  python scripts/bench_peft.py [--seq-len 512] [--steps 5] [--gradient-checkpointing]   # random model in memory
  python scripts/bench_peft.py --make-model DIR      # write the same random model to DIR (for peft-sft to load)
  python scripts/bench_peft.py --model DIR ...       # time a model folder instead (scripts/bench_vs_peft.sh)

The model is a random SmolLM2-135M-shaped LlamaForCausalLM built from its config (hidden 576, intermediate
1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings, rope_theta 100000): nothing is downloaded.
LoRA r=16, alpha=32 (2r), all-linear, dropout 0; labels = input_ids (random, fixed seed).

Runs --steps steps; the first one is a warm-up and is not timed. Prints one JSON line: tokens_per_second (mean
over the timed steps), step_seconds, peak_rss_mib (getrusage ru_maxrss, includes building/loading the model)
and threads (torch.get_num_threads()).

Tested with torch 2.15.0, transformers 5.23.0, peft 0.21.2.
"""
import argparse
import json
import os
import resource
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="CUDA initialization")  # CPU benchmark

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=0, eos_token_id=0,
)


# Public SmolLM2 configs (same family, bigger): for memory measurements (benches/README.md).
SHAPES = {
    "135m": SMOLLM2_135M,
    "360m": {**SMOLLM2_135M, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},
    "1.7b": {**SMOLLM2_135M, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0},
}


def random_model(attn, shape="135m"):
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def bench(args):
    from peft import LoraConfig, get_peft_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    else:
        model = random_model(args.attn)
    model = model.float()
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM",
                                             use_dora=args.use_dora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=gen)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    step_seconds = sum(times) / len(times)
    print(json.dumps({
        "impl": "peft" + (" +gc" if args.gradient_checkpointing else ""),
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "timed_steps": len(times),
        "loss": loss.item(),
        "step_seconds": step_seconds,
        "tokens_per_second": args.seq_len / step_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-model", metavar="DIR", help="write the random model to DIR and exit")
    p.add_argument("--shape", default="135m", choices=sorted(SHAPES), help="SmolLM2 size for --make-model")
    p.add_argument("--model", metavar="DIR", help="time this model folder instead of the in-memory random model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="steps in all; the first is a warm-up (default 5)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--use-dora", action="store_true", help="PEFT's DoRA (use_dora=True)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.make_model:
        random_model(args.attn, args.shape).save_pretrained(args.make_model, safe_serialization=True)
        return
    if args.steps < 2:
        p.error("--steps must be at least 2 (one warm-up step and one timed step)")
    bench(args)


if __name__ == "__main__":
    main()
