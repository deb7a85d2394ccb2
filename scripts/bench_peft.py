#!/usr/bin/env python3
"""HF transformers + PEFT reference for a LoRA SFT step (forward, backward, AdamW) on CPU.

  python scripts/bench_peft.py --make-model DIR          # write a random SmolLM2-135M-shaped model
  python scripts/bench_peft.py --model DIR [--seq-len 512] [--steps 3] [--gradient-checkpointing]

Prints one JSON line: tokens_per_second (mean over timed steps; the first step is a warm-up),
step_seconds, peak_rss_mib (ru_maxrss) and torch's thread count.
"""
import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=0, eos_token_id=0,
)


def make_model(path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(path, safe_serialization=True)


def bench(args):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=gen)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - start)
    step_seconds = sum(times) / len(times)
    print(json.dumps({
        "impl": "peft" + (" +gc" if args.gradient_checkpointing else ""),
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "step_seconds": step_seconds,
        "tokens_per_second": args.seq_len / step_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--make-model")
    p.add_argument("--model")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    if args.make_model:
        make_model(args.make_model)
    else:
        bench(args)


if __name__ == "__main__":
    main()
