#!/usr/bin/env python3
"""Reads a GGUF written by peft-sft with the `gguf` package (llama.cpp's own Python reader) and
checks what llama.cpp needs: for a model, the architecture keys, the tokenizer (tokens, types,
merges, pre-tokenizer, special ids, chat template) and the tensor names/types; for a LoRA
adapter, general.type=adapter, adapter.type=lora, adapter.lora.alpha and lora_a/lora_b pairs with
matching ranks. With --compare HF_DIR [ADAPTER], also loads the GGUF with transformers
(`gguf_file=`) and compares its logits with PEFT's on the safetensors base + adapter.

  pip install gguf  (and torch transformers peft for --compare)
  python scripts/check_gguf.py model.gguf [--compare BASE_DIR ADAPTER_DIR]
  python scripts/check_gguf.py adapter.gguf
"""
import argparse
import sys

import gguf


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))] if len(f.data) < 8 else f"<array of {len(f.data)}>"
    return f.contents()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--compare", nargs="+", metavar=("BASE_DIR", "ADAPTER_DIR"))
    args = p.parse_args()
    r = gguf.GGUFReader(args.path)
    kind = field(r, "general.type")
    arch = field(r, "general.architecture")
    print(f"{args.path}: GGUF v{field(r, 'GGUF.version')}, type {kind}, arch {arch}, {len(r.tensors)} tensors")
    types = {}
    for t in r.tensors:
        types.setdefault(t.tensor_type.name, 0)
        types[t.tensor_type.name] += 1
    print("tensor types:", types)
    problems = []
    names = {t.name: t for t in r.tensors}
    if kind == "adapter":
        if field(r, "adapter.type") != "lora":
            problems.append("adapter.type is not lora")
        print("adapter.lora.alpha:", field(r, "adapter.lora.alpha"))
        for n, t in names.items():
            if n.endswith(".lora_a"):
                b = names.get(n[:-1] + "b")
                if b is None:
                    problems.append(f"{n} has no lora_b")
                elif t.shape[1] != b.shape[0]:  # ne: a = [in, r], b = [r, out]
                    problems.append(f"{n}: rank {t.shape[1]} vs lora_b {b.shape[0]}")
    else:
        for key in ["block_count", "context_length", "embedding_length", "feed_forward_length",
                    "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                    "attention.layer_norm_rms_epsilon"]:
            value = field(r, f"{arch}.{key}")
            if value is None:
                problems.append(f"missing {arch}.{key}")
            print(f"{arch}.{key} = {value}")
        tokens = r.fields["tokenizer.ggml.tokens"]
        n_vocab = len(tokens.data)
        print("tokenizer:", field(r, "tokenizer.ggml.model"), "pre", field(r, "tokenizer.ggml.pre"),
              f"{n_vocab} tokens, {len(r.fields['tokenizer.ggml.merges'].data)} merges,",
              "bos", field(r, "tokenizer.ggml.bos_token_id"), "eos", field(r, "tokenizer.ggml.eos_token_id"),
              "chat template" if "tokenizer.chat_template" in r.fields else "no chat template")
        if names["token_embd.weight"].shape[1] != n_vocab:
            problems.append(f"token_embd has {names['token_embd.weight'].shape[1]} rows, vocab {n_vocab}")
        for required in ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"]:
            if required not in names:
                problems.append(f"missing tensor {required}")
    if args.compare and "rope_freqs.weight" in names:
        print("note: transformers' GGUF loader ignores rope_freqs (Llama 3.1 RoPE scaling), which llama.cpp "
              "applies; its logits would differ for that reason alone, so the comparison is skipped")
    elif args.compare:
        import torch
        from transformers import AutoModelForCausalLM
        base = args.compare[0]
        import os
        ours = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(args.path)),
                                                    gguf_file=os.path.basename(args.path), dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if len(args.compare) > 1:
            from peft import PeftModel
            ref = PeftModel.from_pretrained(ref, args.compare[1])
        ids = torch.tensor([[1, 50, 120, 7, 300, 42, 9]])
        with torch.no_grad():
            a, b = ours(ids).logits, ref(ids).logits
        err = ((a - b).abs().max() / b.abs().max()).item()
        print(f"transformers(GGUF) vs PEFT(safetensors base + adapter): max relative logit difference {err:.2e}")
        if err > 5e-2:
            problems.append(f"logits differ by {err:.2e}")
    for p_ in problems:
        print("PROBLEM:", p_)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
