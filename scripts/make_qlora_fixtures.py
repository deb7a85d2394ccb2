#!/usr/bin/env python3
"""Writes the QLoRA / 4-bit / GGUF reference fixtures under tests/fixtures/qlora/ with the real Python stack.

Run from the repo root: `python scripts/make_qlora_fixtures.py`. Deterministic (fixed seeds, CPU, one torch
thread); no network (HF_HUB_OFFLINE=1). Reads tests/fixtures/models/llama/ (written by
scripts/make_reference_fixtures.py) and never modifies anything outside tests/fixtures/qlora/. Overwrites
every output listed below. See the `qlora/` section of tests/fixtures/README.md for every file.

Written with (also recorded in tests/fixtures/qlora/VERSIONS.txt):
  torch 2.15.0, transformers 5.23.0, peft 0.21.2, bitsandbytes 0.50.2, gguf 0.19.0, safetensors 0.8.0,
  numpy 2.4.6 (Python 3.11, x86-64 with AVX-512F but no AVX-512-BF16).
Other versions may write different numbers: rerun, then rerun the Rust tests.

Outputs (all small, committed):
  nf4.safetensors          bitsandbytes quantize_4bit / dequantize_4bit (nf4 and fp4, with and without double
                           quantization) of several inputs, plus the code tables
  bnb_llama/               models/llama loaded with BitsAndBytesConfig(nf4, double quant, compute f32) and
                           saved with save_pretrained; reference.safetensors (input_ids, logits, logits_full)
  qlora_step/              PEFT LoRA (r 8, alpha 16, all-linear) on bnb_llama: adapter/ and step.safetensors
                           (input_ids, labels, loss, logits, grad.<PEFT key>)
  gguf/                    models/llama written as GGUF the way llama.cpp's converter does (F16, Q8_0, Q4_0),
                           reference.safetensors with the logits of those files read back by transformers
  VERSIONS.txt

Every algorithm the Rust side has to reproduce is also written here in numpy (`ref_*`), and the script asserts
that the numpy version reproduces the library bit for bit, so the numpy code doubles as the spec.
"""
import json
import logging
import math
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

# PEFT writes `target_modules` in set order: fix Python's string hashing so adapter_config.json is reproducible.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TQDM_DISABLE"] = "1"

import accelerate
import bitsandbytes
import bitsandbytes.functional as BF
import gguf
import numpy as np
import peft
import safetensors
import tokenizers
import torch
import transformers
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors import safe_open
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)
logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab complains about the pair template it ignores

OUT = Path("tests/fixtures/qlora")
LLAMA = Path("tests/fixtures/models/llama")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
F32 = np.float32


def ids_for(vocab, seed):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# 0. numpy re-implementations of the bitsandbytes CPU algorithms (asserted bit-exact below)
# ---------------------------------------------------------------------------------------------------------------

def ref_torch_linspace_f32(start, end, steps):
    """torch.linspace(start, end, steps, dtype=float32) on CPU (ATen RangeFactoriesKernel): f32 step, the first
    half counted up from `start`, the second half counted down from `end`, each a fused multiply-add (one
    rounding; the f64 product below is exact)."""
    start, end = F32(start), F32(end)
    step = F32((end - start) / F32(steps - 1))
    out = np.empty(steps, F32)
    for i in range(steps):
        if i < steps // 2:
            out[i] = F32(np.float64(start) + np.float64(step) * i)
        else:
            out[i] = F32(np.float64(end) - np.float64(step) * (steps - 1 - i))
    return out


def ref_dynamic_map():
    """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
    data = []
    for i in range(7):  # exponent 10^(i-6); 2^i + 1 boundaries in [0.1, 1] -> 2^i midpoints
        bounds = ref_torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / F32(2)
        scale = F32(10.0 ** (i - 6))  # python float * f32 tensor: computed in f32
        data += list(scale * means) + list(-scale * means)
    data += [F32(0.0), F32(1.0)]  # 127 positive + 127 negative + 0 + 1 = 256; there is no -1.0
    assert len(data) == 256
    return np.array(sorted(data), dtype=F32)


def ref_quantize_4bit(x, code, blocksize=64):
    """bitsandbytes 'default' backend quantize_4bit (the one CPU uses): returns (packed uint8, absmax f32)."""
    x = np.asarray(x, F32).reshape(-1)
    order = np.argsort(code, kind="stable")  # nf4: identity; fp4: [11 10 13 12 15 14 9 0 8 1 6 7 4 5 2 3]
    bounds = ((code[order[:-1]] + code[order[1:]]) / F32(2)).astype(F32)  # 15 midpoints, ascending
    n = x.size
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, F32)
    inv = F32(1.0) / np.maximum(absmax, F32(1e-38))  # reciprocal, then multiply (full blocks)
    scaled = np.clip(blocks * inv[:, None], F32(-1), F32(1)).reshape(-1)
    if n % blocksize:
        am = np.maximum(np.abs(x[full:]).max(), F32(1e-38))  # the partial block DIVIDES, and keeps the clamp
        absmax = np.concatenate([absmax, [am]]).astype(F32)
        scaled = np.concatenate([scaled, np.clip(x[full:] / am, F32(-1), F32(1))]).astype(F32)
    if scaled.size % 2:
        scaled = np.concatenate([scaled, [F32(0)]]).astype(F32)
    q = order[np.searchsorted(bounds, scaled, side="left")]  # torch.bucketize(right=False): ties go down
    q = q.astype(np.uint8)
    return (q[0::2] << 4) | q[1::2], absmax.astype(F32)


def ref_dequantize_4bit(packed, absmax, code, n, blocksize=64):
    """f32 values (cast to the original dtype afterwards, round-to-nearest-even)."""
    nib = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
    return code[nib] * np.repeat(absmax, blocksize)[:n]


def ref_blockwise8_lut(code):
    """csrc/cpu_ops.cpp build_quantize_lut: 65536 bins over [-1, 1] -> code index."""
    mid = (F32(0.5) * (code[:-1] + code[1:])).astype(F32)
    i = np.arange(65536)
    val = (F32(-1.0) + (F32(2.0) * i.astype(F32)) / F32(65535)).astype(F32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)  # count of midpoints < val


def ref_quantize_blockwise_cpu(x, code, blocksize=256):
    """csrc/cpu_ops.cpp quantize_cpu_impl (f32 input): absmax, v * (1/absmax), LUT index, code index."""
    x = np.asarray(x, F32).reshape(-1)
    lut = ref_blockwise8_lut(code)
    out = np.zeros(x.size, np.uint8)
    absmax = np.zeros(-(-x.size // blocksize), F32)
    for b in range(absmax.size):
        blk = x[b * blocksize:(b + 1) * blocksize]
        m = np.abs(blk).max()
        absmax[b] = m
        if m == 0:
            continue  # codes stay 0 (code[0] = -0.9929..., times absmax 0 = 0)
        v = np.clip(blk * (F32(1.0) / m), F32(-1), F32(1))
        idx = ((v + F32(1)) * F32(0.5) * F32(65535) + F32(0.5)).astype(F32).astype(np.uint16)  # truncation
        out[b * blocksize:(b + 1) * blocksize] = lut[idx]
    return out, absmax


def ref_exact_nearest(x, code, blocksize=256):
    """What an exact nearest-code quantizer would give (for the report: the CPU LUT differs from it)."""
    x = np.asarray(x, F32).reshape(-1)
    out = np.zeros(x.size, np.uint8)
    for b in range(-(-x.size // blocksize)):
        blk = x[b * blocksize:(b + 1) * blocksize]
        m = np.abs(blk).max()
        if m == 0:
            continue
        v = blk * (F32(1.0) / m)
        out[b * blocksize:(b + 1) * blocksize] = np.abs(v[:, None] - code[None, :]).argmin(axis=1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. nf4.safetensors
# ---------------------------------------------------------------------------------------------------------------

def edge_case_input():
    """[8, 61] f32: 7 full blocks of 64 + a partial block of 40, built to hit ties and quirks."""
    nf4 = BF.get_4bit_type("nf4", device="cpu").numpy()
    fp4 = BF.get_4bit_type("fp4", device="cpu").numpy()

    def tie_block(code):  # absmax exactly 1: scaled == value, so the midpoints are hit exactly
        o = np.argsort(code, kind="stable")
        mid = ((code[o[:-1]] + code[o[1:]]) / F32(2)).astype(F32)
        vals = [F32(1.0)] + list(mid) + list(np.nextafter(mid, F32(2))) + list(np.nextafter(mid, F32(-2)))
        vals += list(code)
        vals += [F32(-0.0), F32(1e-30), F32(-1e-30)]
        return np.array(vals[:64] + [F32(0)] * (64 - len(vals[:64])), F32)

    b0, b1 = tie_block(nf4), tie_block(fp4)
    rng = np.random.default_rng(5)
    b2 = (rng.standard_normal(64) * 1e37).astype(F32)  # huge: 1/absmax is subnormal in f32
    b2[7] = F32(3.0e38)
    b3 = (rng.standard_normal(64) * 1e-37).astype(F32)  # tiny normals (and a few subnormals)
    b4 = (rng.standard_normal(64) * 0.5).astype(F32)
    b4[33] = F32(-2.5)  # absmax comes from a negative value -> code -1.0
    # x * (1/m) (full block) and x / m (partial block) that fall on different sides of a midpoint
    m = F32(2.9)
    cands = []
    for code in (nf4, fp4):
        o = np.argsort(code, kind="stable")
        mid = ((code[o[:-1]] + code[o[1:]]) / F32(2)).astype(F32)
        for bnd in mid:
            x0 = F32(bnd * m)
            for k in range(-6, 7):
                x = x0
                for _ in range(abs(k)):
                    x = np.nextafter(x, F32(np.inf) if k > 0 else F32(-np.inf))
                s_mul = np.clip(x * (F32(1) / m), -1, 1)
                s_div = np.clip(x / m, -1, 1)
                if np.searchsorted(mid, s_mul) != np.searchsorted(mid, s_div) and x not in cands:
                    cands.append(x)
    cands = cands[:39]
    assert len(cands) >= 4, cands
    b5 = np.zeros(64, F32)
    b5[0] = m
    b5[1:1 + len(cands)] = cands
    b6 = np.full(64, F32(0.3), F32)  # constant block: everything maps to +1.0
    tail = np.zeros(40, F32)
    tail[0] = m
    tail[1:1 + len(cands)] = cands[:39]
    x = np.concatenate([b0, b1, b2, b3, b4, b5, b6, tail]).astype(F32)
    assert x.size == 8 * 61
    return torch.from_numpy(x.reshape(8, 61)), len(cands)


def nf4_cases():
    gen = torch.Generator().manual_seed(2024)
    cases = {
        "f32_104x160": torch.randn(104, 160, generator=gen) * 0.2,  # 260 blocks -> nested blocks 256 + 4
        "f32_10x50": torch.randn(10, 50, generator=gen) * 3.0,  # 500 = 7 * 64 + 52: partial last block
        "f16_96x64": (torch.randn(96, 64, generator=gen) * 0.1).half(),
        "bf16_96x64": (torch.randn(96, 64, generator=gen) * 0.1).bfloat16(),
        "f32_7x9": torch.randn(7, 9, generator=gen),  # 63 values: odd, the packed tail nibble is padding
    }
    z = torch.randn(4, 58, generator=gen).reshape(-1)  # 232 = 3 * 64 + 40
    z[64:128] = 0  # an all-zero full block: absmax 0
    z[192:] = 0  # an all-zero partial block: absmax 1e-38 (the clamp is kept there)
    cases["f32_zero_blocks"] = z.reshape(4, 58)
    cases["f32_edge"], n_recip = edge_case_input()
    return cases, n_recip


def write_nf4():
    codes = {q: BF.get_4bit_type(q, device="cpu") for q in ("nf4", "fp4")}
    dynamic = BF.create_dynamic_map()
    assert np.array_equal(ref_dynamic_map(), dynamic.numpy()), "create_dynamic_map re-implementation"
    tensors = {"nf4.code": codes["nf4"].contiguous(), "fp4.code": codes["fp4"].contiguous(),
               "dynamic.code": dynamic.contiguous()}
    cases, n_recip = nf4_cases()
    lut_vs_exact = 0
    cpu_kernel_wrong = []
    for name, x in cases.items():
        tensors[f"{name}.input"] = x.contiguous()
        n = x.numel()
        xf = x.float().numpy().reshape(-1)
        for q, code in codes.items():
            c = code.numpy()
            p, s = BF.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type=q)
            packed = p.reshape(-1)
            rp, ra = ref_quantize_4bit(xf, c)
            assert np.array_equal(rp, packed.numpy()) and np.array_equal(ra, s.absmax.numpy()), (name, q)
            # bitsandbytes' own generic dequantization (the CPU backend uses it for odd last dims)
            deq = _dequantize_4bit_compute.__wrapped__(packed, s.absmax, code, 64, x.shape, x.dtype)
            ref = torch.from_numpy(ref_dequantize_4bit(rp, ra, c, n)).reshape(x.shape).to(x.dtype)
            assert torch.equal(deq, ref), (name, q)
            # the dispatched CPU kernel (AVX-512 on this host) is wrong when the last dim is a multiple of 16 but
            # not of the block size: it indexes absmax per row (row * (cols // 64) + col // 64).
            if not torch.equal(BF.dequantize_4bit(p, s), deq):
                cpu_kernel_wrong.append(f"{name}.{q}")
            p2, s2 = BF.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type=q)
            assert torch.equal(p2, p), "double quantization changes only the absmax"
            assert s2.state2.blocksize == 256 and torch.equal(s2.state2.code, dynamic)
            offset = s2.offset.reshape(1).float()
            assert offset.item() == s.absmax.mean().item()
            centred = (s.absmax - s2.offset).numpy()
            rq, rn = ref_quantize_blockwise_cpu(centred, dynamic.numpy())
            assert np.array_equal(rq, s2.absmax.numpy()) and np.array_equal(rn, s2.state2.absmax.numpy()), name
            lut_vs_exact += int((ref_exact_nearest(centred, dynamic.numpy()) != rq).sum())
            absmax_dq = BF.dequantize_blockwise(s2.absmax, s2.state2) + s2.offset
            ref_absmax_dq = dynamic.numpy()[rq] * np.repeat(rn, 256)[:rq.size] + offset.numpy()[0]
            assert np.array_equal(absmax_dq.numpy(), ref_absmax_dq.astype(F32))
            deq2 = _dequantize_4bit_compute.__wrapped__(packed, absmax_dq, code, 64, x.shape, x.dtype)
            ref2 = torch.from_numpy(ref_dequantize_4bit(rp, ref_absmax_dq.astype(F32), c, n))
            assert torch.equal(deq2, ref2.reshape(x.shape).to(x.dtype))
            k = f"{name}.{q}"
            tensors.update({
                f"{k}.packed": packed.contiguous(),
                f"{k}.absmax": s.absmax.contiguous(),
                f"{k}.dequant": deq.contiguous(),
                f"{k}.dq.absmax": s2.absmax.contiguous(),
                f"{k}.dq.offset": offset.contiguous(),
                f"{k}.dq.nested_absmax": s2.state2.absmax.contiguous(),
                f"{k}.dq.packed": p2.reshape(-1).contiguous(),
                f"{k}.dq.absmax_dequant": absmax_dq.contiguous(),
                f"{k}.dq.dequant": deq2.contiguous(),
            })
    # The nested quantizer on its own (bitsandbytes.functional.quantize_blockwise, dynamic map, blocksize 256):
    # enough values that the CPU's 65536-bin LUT and an exact nearest-code search disagree somewhere.
    gen = torch.Generator().manual_seed(77)
    x8 = torch.randn(4000, generator=gen) * torch.rand(4000, generator=gen)  # 15 full blocks + 160
    x8[512:768] = 0
    q8, s8 = BF.quantize_blockwise(x8, blocksize=256)
    rq, rn = ref_quantize_blockwise_cpu(x8.numpy(), dynamic.numpy())
    assert np.array_equal(rq, q8.numpy()) and np.array_equal(rn, s8.absmax.numpy())
    exact = ref_exact_nearest(x8.numpy(), dynamic.numpy())
    n_lut = int((exact != rq).sum())
    assert n_lut > 0
    tensors.update({"blockwise8.input": x8, "blockwise8.codes": q8, "blockwise8.absmax": s8.absmax,
                    "blockwise8.dequant": BF.dequantize_blockwise(q8, s8),
                    "blockwise8.exact_nearest_codes": torch.from_numpy(exact)})
    # Edge-case checks: the partial block divides where full blocks multiply by the reciprocal.
    e = tensors["f32_edge.nf4.packed"].numpy(), tensors["f32_edge.fp4.packed"].numpy()
    differs = any((pk[5 * 32:6 * 32][:20] != pk[7 * 32:7 * 32 + 20]).any() for pk in e)
    assert differs, "edge case: reciprocal-multiply and divide should disagree somewhere"
    zero_tail = tensors["f32_zero_blocks.nf4.absmax"]
    assert zero_tail[1].item() == 0.0 and zero_tail[3].item() == np.float32(1e-38).item()
    save_file(tensors, OUT / "nf4.safetensors")
    print(f"qlora/nf4.safetensors: {len(cases)} cases x 2 types, {len(tensors)} tensors; numpy reference matches; "
          f"{n_recip} reciprocal-vs-divide values; nested LUT codes != exact nearest: {lut_vs_exact} in the cases, "
          f"{n_lut} of 4000 in blockwise8; "
          f"dispatched CPU dequantize_4bit wrong for: {cpu_kernel_wrong or 'none'}")


# ---------------------------------------------------------------------------------------------------------------
# 2. bnb_llama/
# ---------------------------------------------------------------------------------------------------------------

def bnb_config():
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)


def load_llama(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


def ref_dequant_checkpoint(st, prefix):
    """Dequantize one saved bnb linear from its safetensors entries (nf4, double quant) with the numpy spec."""
    qs = json.loads(bytes(st[prefix + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
    shape, bs = qs["shape"], qs["blocksize"]
    n = shape[0] * shape[1]
    codes = st[prefix + ".absmax"].numpy()
    absmax = (st[prefix + ".nested_quant_map"].numpy()[codes] * np.repeat(st[prefix + ".nested_absmax"].numpy(),
              qs["nested_blocksize"])[:codes.size] + F32(qs["nested_offset"])).astype(F32)
    w = ref_dequantize_4bit(st[prefix].numpy().reshape(-1), absmax, st[prefix + ".quant_map"].numpy(), n, bs)
    return torch.from_numpy(w.reshape(shape))


def write_bnb_llama():
    path = OUT / "bnb_llama"
    shutil.rmtree(path, ignore_errors=True)
    qmodel = load_llama(LLAMA, quantization_config=bnb_config(), device_map="cpu")
    qmodel.save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(LLAMA / f, path / f)
    full = load_llama(LLAMA)
    ids = ids_for(full.config.vocab_size, 21)
    with torch.no_grad():
        logits = qmodel(ids).logits.float().contiguous()
        logits_full = full(ids).logits.float().contiguous()

    # The saved tensors are quantize_4bit(f32 weight, nf4, blocksize 64, compress_statistics=True).
    st = load_file(path / "model.safetensors")
    orig = load_file(LLAMA / "model.safetensors")
    linears = sorted(k[:-len(".quant_state.bitsandbytes__nf4")] for k in st if k.endswith("bitsandbytes__nf4"))
    assert len(linears) == 14
    deq_model = load_llama(LLAMA)
    deq_sd = deq_model.state_dict()
    for k in linears:
        p, s = BF.quantize_4bit(orig[k], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(st[k], p) and torch.equal(st[k + ".absmax"], s.absmax)
        assert torch.equal(st[k + ".nested_absmax"], s.state2.absmax)
        deq_sd[k].copy_(ref_dequant_checkpoint(st, k))
    # A plain f32 llama holding the dequantized weights gives the same logits: on CPU (no AVX-512-BF16) a
    # Linear4bit is F.linear(x, dequantize(W)).
    with torch.no_grad():
        deq_logits = deq_model(ids).logits
    assert torch.equal(deq_logits, logits), (deq_logits - logits).abs().max()
    reloaded = load_llama(path, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits), "reload of the saved 4-bit checkpoint"
    k = "model.layers.0.self_attn.k_proj.weight"
    save_file({"input_ids": ids, "logits": logits, "logits_full": logits_full,
               "dequant." + k: deq_sd[k].contiguous()}, path / "reference.safetensors")
    diff = (logits - logits_full).abs().max().item()
    print(f"qlora/bnb_llama: {len(linears)} Linear4bit, {len(st)} saved tensors; logits == plain llama with "
          f"dequantized weights; max |logits - logits_full| = {diff:.4f}")


# ---------------------------------------------------------------------------------------------------------------
# 3. qlora_step/
# ---------------------------------------------------------------------------------------------------------------

def lora_config():
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def peft_key(param_name):
    return param_name.replace(".default", "")


def lora_step(base, ids, labels, lora_state=None):
    torch.manual_seed(3)
    model = peft.get_peft_model(base, lora_config())
    if lora_state is None:
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    else:
        peft.set_peft_model_state_dict(model, lora_state)
    model.train()  # dropout is 0: train and eval compute the same
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {peft_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, out, grads


def write_qlora_step():
    path = OUT / "qlora_step"
    shutil.rmtree(path, ignore_errors=True)
    base = load_llama(OUT / "bnb_llama", device_map="cpu")  # the pre-quantized checkpoint from step 2
    ids = ids_for(base.config.vocab_size, 23)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:12] = -100
    model, out, grads = lora_step(base, ids, labels)
    model.save_pretrained(path / "adapter")
    (path / "adapter" / "README.md").unlink(missing_ok=True)
    saved = load_file(path / "adapter" / "adapter_model.safetensors")
    assert set(saved) == set(grads) and len(grads) == 28, sorted(set(saved) ^ set(grads))
    assert all(g.abs().sum() > 0 for g in grads.values())

    # Same step on a plain f32 llama holding the dequantized weights: same loss and gradients.
    st = load_file(OUT / "bnb_llama" / "model.safetensors")
    plain = load_llama(LLAMA)
    with torch.no_grad():
        for k, v in plain.state_dict().items():
            if k + ".quant_state.bitsandbytes__nf4" in st:
                v.copy_(ref_dequant_checkpoint(st, k))
    _, out2, grads2 = lora_step(plain, ids, labels, lora_state=saved)
    assert torch.equal(out2.loss, out.loss), (out2.loss, out.loss)
    gdiff = max(((grads2[k] - g).abs().max() / g.abs().max()).item() for k, g in grads.items())
    assert gdiff < 1e-5, gdiff

    tensors = {"input_ids": ids, "labels": labels, "loss": out.loss.detach().float().reshape(1),
               "logits": out.logits.detach().float().contiguous()}
    tensors.update({"grad." + k: g.contiguous() for k, g in grads.items()})
    save_file(tensors, path / "step.safetensors")
    print(f"qlora/qlora_step: loss {out.loss.item():.4f} over {(labels[:, 1:] != -100).sum().item()} targets, "
          f"{len(grads)} LoRA grads; plain dequantized llama: same loss, grads within {gdiff:.1e} (relative)")


# ---------------------------------------------------------------------------------------------------------------
# 4. gguf/
# ---------------------------------------------------------------------------------------------------------------

def gguf_permute(w, n_head, n_head_kv):
    """llama.cpp conversion/llama.py LlamaModel.permute (q: n_head_kv = n_head; k: the KV head count)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w, n_head, n_head_kv):
    """The inverse (transformers LlamaTensorProcessor._reverse_permute_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama3_rope_freqs(config):
    """llama.cpp LlamaModel.generate_extra_tensors for rope_type llama3 (f64 math, stored f32). Uses the model's
    own original_max_position_embeddings (upstream reads it from the top level of config.json, which transformers
    5 no longer writes, and falls back to 8192; see the README)."""
    rp = config.rope_parameters
    base, dim = rp["rope_theta"], config.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old_ctx = rp["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32), freqs


def gguf_vocab(tok_dir, vocab_size):
    """conversion/base.py TextModel.get_vocab_base (tokens + token types)."""
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    reverse = {i: t for t, i in tok.vocab.items()}
    added = tok.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            dec = tok.added_tokens_decoder[i]
            if not dec.normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if dec.special or (t.startswith("<|") and t.endswith("|>"))
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, types


GGUF_FILES = {  # name -> (LlamaFileType, GGMLQuantizationType of the 2-D weights)
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
GGUF_PRE = "gpt-2"  # llama.cpp pre-tokenizer whose regex is the byte-level GPT-2 one our tokenizer uses


def write_gguf_file(path, ftype, wtype, config, rope_freqs):
    hp = config.to_dict()
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # prepare_tensors: generate_extra_tensors first, then the checkpoint in its own (safetensors) order
    named = [("rope_freqs.weight", rope_freqs)]
    with safe_open(LLAMA / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("q_proj.weight"):
                t = gguf_permute(t, n_head, n_head)
            elif name.endswith("k_proj.weight"):
                t = gguf_permute(t, n_head, n_kv)
            named.append((tmap.get_name(name, try_suffixes=(".weight", ".bias")), t))
    for new_name, t in named:
        data = t.float().numpy()
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else wtype
        w.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    # prepare_metadata: general.*, then set_gguf_parameters, then the quantization version, then the vocab
    w.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, LLAMA, None, total)
    meta.name = meta.name or LLAMA.name
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, count)
    meta.set_gguf_meta_model(w)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(hp["rope_parameters"]["rope_theta"])  # llama3: no rope.scaling.* keys, rope_freqs instead
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(ftype)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = gguf_vocab(LLAMA, config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(LLAMA, load_merges=True).add_to_gguf(w, quiet=True)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf_file(path, config, orig):
    """Read the file back with gguf's reader: names, types, the permutation, and the metadata."""
    r = gguf.GGUFReader(path)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    back = {tmap.get_name(k, try_suffixes=(".weight",)): k for k in orig}
    seen = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        v = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        hf = back[t.name]
        if hf.endswith("q_proj.weight"):
            v = gguf_unpermute(v, config.num_attention_heads, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            v = gguf_unpermute(v, config.num_attention_heads, config.num_key_value_heads)
        seen[hf] = (t.tensor_type.name, float(np.abs(v - orig[hf].numpy()).max()), v)
    assert set(seen) == set(orig)
    return seen


def write_gguf():
    path = OUT / "gguf"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = transformers.AutoConfig.from_pretrained(LLAMA)
    rope_freqs, base_freqs = llama3_rope_freqs(config)
    # llama.cpp divides each base frequency by its factor; transformers' llama3 inv_freq is the same thing.
    hf_model = load_llama(LLAMA)
    inv_freq = hf_model.model.rotary_emb.inv_freq
    rel = ((base_freqs / rope_freqs - inv_freq).abs() / inv_freq).max().item()
    assert rel < 1e-6, rel
    orig = load_file(LLAMA / "model.safetensors")
    ids = load_file(LLAMA / "reference.safetensors")["input_ids"]
    with torch.no_grad():
        logits_hf = hf_model(ids).logits.float().contiguous()
    assert torch.equal(logits_hf, load_file(LLAMA / "reference.safetensors")["logits"])
    tensors = {"input_ids": ids, "logits_hf": logits_hf, "rope_freqs": rope_freqs}
    report = []
    for name, (ftype, wtype) in GGUF_FILES.items():
        fname = f"model-{name}.gguf"
        write_gguf_file(path / fname, ftype, wtype, config, rope_freqs)
        seen = check_gguf_file(path / fname, config, orig)
        # An independent reader: transformers' GGUF loader (gguf-py dequantization, its own un-permute and names).
        tg = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=fname,
                                                               attn_implementation="eager").eval()
        tc = tg.config
        for a in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "num_hidden_layers", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            want = F32(config.rms_norm_eps) if a == "rms_norm_eps" else getattr(config, a)  # GGUF stores f32
            assert getattr(tc, a) == want, (a, getattr(tc, a), want)
        assert tc.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
        with torch.no_grad():
            logits_plain = tg(ids).logits  # transformers ignores rope_freqs.weight: default RoPE
        # so run its weights in a llama with the original config (llama3 RoPE, as llama.cpp applies rope_freqs)
        m = transformers.LlamaForCausalLM(config)
        m.config._attn_implementation = "eager"
        m.load_state_dict(tg.state_dict(), strict=True)
        m.eval()
        with torch.no_grad():
            logits = m(ids).logits.float().contiguous()
        for k, (_, _, v) in seen.items():  # our un-permuted read-back == transformers' weights
            assert torch.equal(torch.from_numpy(np.ascontiguousarray(v)), tg.state_dict()[k]), k
        tensors[f"logits_{name}"] = logits
        d = (logits - logits_hf).abs().max().item()
        d_plain = (logits_plain - logits_hf).abs().max().item()
        werr = max(err for _, err, _ in seen.values())
        report.append(f"{name}: max|logits - logits_hf| {d:.2e} (max weight err {werr:.1e}; with transformers' "
                      f"default RoPE instead of rope_freqs: {d_plain:.2e})")
    save_file(tensors, path / "reference.safetensors")
    print("qlora/gguf: " + "; ".join(report))


# ---------------------------------------------------------------------------------------------------------------

def write_versions():
    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "gguf": _dist_version("gguf"),
        "tokenizers": tokenizers.__version__, "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__, "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (OUT / "VERSIONS.txt").write_text("".join(f"{k} {v}\n" for k, v in versions.items()))


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    steps = sys.argv[1:] or ["nf4", "bnb", "step", "gguf"]
    if "nf4" in steps:
        write_nf4()
    if "bnb" in steps:
        write_bnb_llama()
    if "step" in steps:
        write_qlora_step()
    if "gguf" in steps:
        write_gguf()
    write_versions()


if __name__ == "__main__":
    main()
