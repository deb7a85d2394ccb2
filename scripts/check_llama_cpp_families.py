#!/usr/bin/env python3
"""llama.cpp itself (through llama-cpp-python) on the GGUF files peft-sft writes for the families
whose llama.cpp architectures differ from llama's: Gemma (gemma), Gemma 2 (gemma2), Gemma 3 and
Gemma 3's multimodal text model (gemma3), Phi-3 (phi3), Mixtral (llama with experts), Qwen3-MoE
(qwen3moe); llama.cpp adapters (`export-adapter`) for Gemma 2 and Phi-3's fused modules; and a
SentencePiece vocabulary written as llama.cpp's `llama` model.

For each tiny fixture model (tests/fixtures/models, its config edited where llama.cpp's
architecture cannot follow it: no sliding window for phi3/llama, every Qwen3-MoE layer routed)
`peft-sft merge --output x.gguf --quantize f32` converts it, and llama.cpp's logits on random ids
are compared with transformers' (PEFT's, for the adapters).

  pip install llama-cpp-python   # builds llama.cpp (about 30 minutes on 2 cores)
  cargo build && python scripts/check_llama_cpp_families.py [--bin target/debug/peft-sft]

Exits 1 when a difference exceeds --tol (relative to the largest logit). llama.cpp's CPU GELU goes
through an f16 table (Gemma: ~1e-3; the KV cache is kept in f32 here), and the mixtures' fixture
routers have near ties that such noise can tip on single positions (the median is printed too).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# fixture, config edits, tokens, llama.cpp context
MODELS = [
    ("gemma", {}, 16, 64),
    ("gemma2", {}, 16, 64),
    ("gemma3", {}, 16, 64),
    ("gemma3_multimodal", {}, 16, 64),
    # llama.cpp pads the context to 256 > the original 8, so it always rotates with the long
    # factors: compare where transformers does too (more than 8 tokens).
    ("phi3", {"sliding_window": None}, 16, 64),
    ("mixtral", {"sliding_window": None}, 16, 64),
    ("qwen3_moe", {"mlp_only_layers": [], "num_hidden_layers": 1}, 16, 64),
]
ADAPTERS = ["gemma2", "phi3", "mixtral"]


def edited(name, edits, into):
    """A copy of the fixture with its config edited (llama.cpp reads the name: avoid `phi3`)."""
    dst = Path(into) / f"m_{len(os.listdir(into))}"
    shutil.copytree(FIXTURES / "models" / name, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(edits)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def hf_logits(model_dir, ids, adapter=None):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if config.architectures[0] == "Gemma3ForConditionalGeneration":
        model = transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    if adapter is not None:
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(ids).logits[0].float().numpy()


def llama_cpp_logits(path, ids, n_ctx, lora=None):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=n_ctx,
                n_batch=64, n_threads=2, verbose=False, type_k=0, type_v=0)  # an f32 KV cache
    llm.eval(ids[0].tolist())
    return np.array(llm.scores[: ids.shape[1]], dtype=np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(ROOT / "target" / "debug" / "peft-sft"))
    p.add_argument("--tol", type=float, default=2e-2)
    args = p.parse_args()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(*cli):
            out = subprocess.run([args.bin, *cli], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"peft-sft {' '.join(cli)} failed:\n{out.stderr}")

        def compare(what, got, want):
            diff = np.abs(got - want).max(-1) / np.abs(want).max()
            print(f"{what:42s} max {diff.max():.2e}  median {np.median(diff):.2e}")
            if diff.max() > args.tol:
                failed.append(what)

        for name, edits, t, n_ctx in MODELS:
            model = edited(name, edits, tmp)
            gguf = Path(tmp) / f"{name.replace('phi3', 'p3')}.gguf"
            run("merge", "--model", str(model), "--output", str(gguf), "--quantize", "f32")
            vocab = transformers.AutoConfig.from_pretrained(model).get_text_config().vocab_size
            ids = torch.randint(3, vocab - 10, (1, t), generator=torch.Generator().manual_seed(5))
            compare(f"{name} (merge --output x.gguf)", llama_cpp_logits(gguf, ids, n_ctx), hf_logits(model, ids))
        for name in ADAPTERS:
            edits = next(e for n, e, _, _ in MODELS if n == name)
            model = edited(name, edits, tmp)
            adapter = FIXTURES / "peft" / name / "adapter"
            base = Path(tmp) / f"base_{name.replace('phi3', 'p3')}.gguf"
            lora = Path(tmp) / f"lora_{name.replace('phi3', 'p3')}.gguf"
            run("merge", "--model", str(model), "--output", str(base), "--quantize", "f32")
            run("export-adapter", "--adapter", str(adapter), "--model", str(model), "--output", str(lora))
            vocab = transformers.AutoConfig.from_pretrained(model).vocab_size
            ids = torch.randint(3, vocab - 10, (1, 16), generator=torch.Generator().manual_seed(6))
            compare(f"{name} base + export-adapter (--lora)", llama_cpp_logits(base, ids, 64, lora),
                    hf_logits(model, ids, adapter))
        # A SentencePiece vocabulary: the tiny SentencePiece GGUF fixture as a transformers folder
        # (tokenizer.json BPE with byte fallback), exported by peft-sft; llama.cpp must tokenize
        # the export as it tokenizes the original, SentencePiece-scored file.
        from llama_cpp import Llama
        from safetensors.torch import save_file
        spm = FIXTURES / "gguf_spm"
        folder = Path(tmp) / "spm"
        tok = transformers.AutoTokenizer.from_pretrained(spm, gguf_file="model.gguf")
        model = transformers.AutoModelForCausalLM.from_pretrained(spm, gguf_file="model.gguf")
        tok.save_pretrained(folder)
        model.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        exported = Path(tmp) / "spm.gguf"
        run("merge", "--model", str(folder), "--output", str(exported), "--quantize", "f32")
        ours = Llama(model_path=str(exported), vocab_only=True, verbose=False)
        original = Llama(model_path=str(spm / "model.gguf"), vocab_only=True, verbose=False)
        texts = [c["text"] for c in json.loads((spm / "reference.json").read_text())["cases"]]
        differ = sum(ours.tokenize(t.encode(), add_bos=True, special=s) != original.tokenize(t.encode(), add_bos=True,
                     special=s) for t in texts for s in (True, False))
        print(f"{'SentencePiece vocabulary (llama.cpp tokens)':42s} {differ} of {2 * len(texts)} tokenizations differ")
        if differ:
            failed.append("sentencepiece")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
