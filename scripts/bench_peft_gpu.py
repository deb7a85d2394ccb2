#!/usr/bin/env python3
"""HF transformers + PEFT on one GPU: a LoRA (or QLoRA) SFT step — forward, backward, clip, AdamW — with
random weights of a given config, made on the device (nothing downloaded, no files written).

  python scripts/bench_peft_gpu.py --config tests/fixtures/configs/llama-3.1-8b.json --seq-len 2048 \
      [--lora-r 16] [--qlora] [--gradient-checkpointing] [--steps 4] [--dtype bf16]

bf16 base and activations (torch SDPA attention), LoRA all-linear with alpha = 2r, dropout 0, batch 1; the
adapter weights are float32, as PEFT keeps them by default (autocast_adapter_dtype); the step runs under
torch.autocast(bf16) as the HF Trainer's --bf16 does. --qlora quantizes every decoder linear to NF4 with
double quantization through bitsandbytes (what BitsAndBytesConfig(load_in_4bit, nf4, double quant)
gives). Gradient checkpointing is transformers' (use_reentrant=False), as TRL sets it.

The first step is a warm-up; the rest are timed with torch.cuda.synchronize(). Prints one JSON line:
tokens_per_second, step_seconds (median of the timed steps), torch's peak allocated/reserved bytes over the
timed steps, and the wall-clock window of the timed steps (timed_start/timed_end, epoch seconds) so that
an outside memory sampler (scripts/gpu_mem_peak.py) can take its peak over the same window for both stacks.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def quantize_linears(model, dtype, device):
    import bitsandbytes as bnb

    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.to(device))
                del child
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script without a GPU")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with open(args.config) as f:
        fields = json.load(f)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    load_start = time.time()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with dev:
        try:  # transformers >= 4.56 names it `dtype`, earlier ones `torch_dtype`
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    model = model.to(dtype)
    if args.qlora:
        quantize_linears(model, dtype, dev)
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        # prepare_model_for_kbit_training (which TRL calls for a 4-bit model) upcasts the
        # embeddings, norms and LM head to f32: what a TRL + bitsandbytes user gets.
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    sync()
    load_seconds = time.time() - load_start
    if cuda:
        torch.cuda.empty_cache()

    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=dev, generator=g)
    times = []
    timed_start = None
    for step in range(args.steps + 1):
        if step == 1:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            timed_start = time.time()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step > 0:
            times.append(time.perf_counter() - t0)
    timed_end = time.time()
    step_seconds = statistics.median(times)
    print(json.dumps({
        "impl": "hf+peft" + (" qlora" if args.qlora else " lora") + (" +gc" if args.gradient_checkpointing else ""),
        "seq_len": args.seq_len, "lora_r": args.lora_r, "dtype": args.dtype,
        "trainable_params": sum(p.numel() for p in params),
        "load_seconds": load_seconds,
        "step_seconds": step_seconds, "step_seconds_all": times,
        "tokens_per_second": args.seq_len / step_seconds,
        "torch_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "torch_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
        "loss": float(out.loss.detach()),
        "adapter_dtype": str(params[0].dtype),
        "four_bit_linears": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
        "base_dtype": str(next(p.dtype for n, p in model.named_parameters() if "lora_" not in n
                               and p.dtype != torch.uint8)),
        "timed_start": timed_start, "timed_end": timed_end,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
