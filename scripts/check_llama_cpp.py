#!/usr/bin/env python3
"""Loads peft-sft's GGUF files with llama.cpp itself (through llama-cpp-python) and compares its
tokenization and logits with peft-sft's.

  pip install llama-cpp-python   # builds llama.cpp (about 30 minutes on 2 cores)
  cargo run --example adapter_logits -- BASE_DIR ADAPTER_DIR /tmp/expected.safetensors
  cargo run -- merge --model BASE_DIR --adapter ADAPTER_DIR --output /tmp/merged.gguf
  cargo run -- merge --model BASE_DIR --output /tmp/base.gguf          # conversion, no adapter
  cargo run -- export-adapter --adapter ADAPTER_DIR --output /tmp/lora.gguf
  python scripts/check_llama_cpp.py /tmp/merged.gguf /tmp/expected.safetensors --text "What is the capital of France? Paris."
  python scripts/check_llama_cpp.py /tmp/base.gguf /tmp/expected.safetensors --lora /tmp/lora.gguf --text "..."

EXPECTED holds `input_ids` [1, T] and `logits` [1, T, V] of base + adapter computed by peft-sft.
Exits 1 when llama.cpp tokenizes the text differently or its logits differ by more than --tol
(relative to the largest logit).
"""
import argparse
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("expected")
    p.add_argument("--lora")
    p.add_argument("--text", help="the text EXPECTED's ids encode (checks llama.cpp's tokenizer)")
    p.add_argument("--tol", type=float, default=2e-2)
    args = p.parse_args()
    from llama_cpp import Llama

    expected = load_file(args.expected)
    ids = [int(i) for i in expected["input_ids"].reshape(-1)]
    want = expected["logits"].reshape(len(ids), -1).astype(np.float32)
    llm = Llama(model_path=args.model, lora_path=args.lora, logits_all=True, n_ctx=256, n_threads=2,
                n_batch=256, verbose=False)
    problems = []
    if args.text is not None:
        toks = llm.tokenize(args.text.encode(), add_bos=True, special=True)
        print(f"llama.cpp tokens: {toks[:12]}{' ...' if len(toks) > 12 else ''} ({len(toks)})")
        print(f"peft-sft  tokens: {ids[:12]}{' ...' if len(ids) > 12 else ''} ({len(ids)})")
        if toks != ids:
            problems.append("llama.cpp tokenizes the text differently")
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)[:, : want.shape[1]]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    what = f"{args.model}" + (f" + LoRA {args.lora}" if args.lora else "")
    print(f"llama.cpp({what}) vs peft-sft (base + adapter): max relative logit difference {err:.2e}")
    if err > args.tol:
        problems.append(f"logits differ by {err:.2e} (> {args.tol})")
    for pr in problems:
        print("PROBLEM:", pr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
