#!/usr/bin/env python3
"""Writes tests/fixtures/trl_packing/: what TRL's SFTTrainer does with `packing=True` and `assistant_only_loss=True`.

Run from the repo root: `python scripts/make_trl_packing_fixtures.py`. Deterministic (CPU, f32, fixed inputs);
offline. Reads tests/fixtures/{tokenizers,models,data,trl}/ (written by make_reference_fixtures.py), writes only
tests/fixtures/trl_packing/. See tests/fixtures/README.md, section `trl_packing/`, for every file.

Everything is produced by the real `trl.SFTTrainer` (dataset preparation + `trainer.data_collator`) and the real
transformers model. The packing algorithm is also written here in plain Python (`ref_pack_*`) and asserted equal to
TRL's output, so this script doubles as the spec (and gives the packed-row -> source-row mapping).

Written with torch 2.15.0, transformers 5.23.0, trl 1.16.0, datasets 5.2.0, pyarrow 26.0.1 (Python 3.11).
"""
import json
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import pyarrow
import torch
import transformers
import trl
from datasets import Dataset
from safetensors.torch import save_file
from trl import SFTConfig, SFTTrainer
from trl.data_utils import _tokenize

torch.manual_seed(0)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
datasets.disable_caching()
warnings.filterwarnings("ignore")

FIX = Path("tests/fixtures")
OUT = FIX / "trl_packing"
TOK_DIR = FIX / "tokenizers" / "chatml"
MODEL_DIR = FIX / "models" / "qwen2"
DATASETS = {
    "qa_chat": FIX / "data" / "qa_chat.jsonl",
    "messages": FIX / "trl" / "messages.jsonl",
}
STRATEGIES = ["bfd", "bfd_split", "wrapped"]  # "bfd" is TRL 1.16's default `packing_strategy`
MAX_LENGTHS = [32, 64, 128]  # 128 added: at 32/64 nearly every chatml row is longer than a bin, nothing co-packs
GEN_TEMPLATE = OUT / "chatml_generation.jinja"

# Our chatml template (SmolLM2's) with the assistant turn split into its own branch, TRL-style (same pattern as
# trl/chat_templates/lfm2_training.jinja): the `<|im_start|>assistant\n` prompt cue stays outside the generation
# block; the content, `<|im_end|>` and the newline after it are inside. Renders byte-identically to the original.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def dumps(obj, indent=0):
    """JSON with one-space indentation, but lists of scalars on one line (keeps the files small and diffable)."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (list, dict)) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        return "[\n" + ",\n".join(pad1 + dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    path.write_text(dumps(obj) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOK_DIR)


def to_py(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def make_trainer(rows, out_dir, attn_implementation=None, **config):
    """An SFTTrainer exactly as make_reference_fixtures.trl_process builds it, on all rows at once."""
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kw)
    args = SFTConfig(output_dir=out_dir, report_to=[], bf16=False, use_cpu=True, seed=0, **config)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer())


CONFIG_FIELDS = ["max_length", "packing", "packing_strategy", "padding_free", "completion_only_loss",
                 "assistant_only_loss", "shuffle_dataset", "truncation_mode", "pad_to_multiple_of",
                 "chat_template_path", "dataset_num_proc", "per_device_train_batch_size"]


def effective_config(trainer):
    args = trainer.args
    eff = {f: getattr(args, f) for f in CONFIG_FIELDS}
    eff["completion_only_loss"] = trainer.completion_only_loss
    eff["padding_free"] = trainer.padding_free  # as the trainer resolved it (bfd/bfd_split force it on)
    eff["collator"] = type(trainer.data_collator).__name__
    eff["collator_padding_free"] = trainer.data_collator.padding_free
    eff["pad_token_id"] = trainer.data_collator.pad_token_id
    eff["attn_implementation"] = trainer.model.config._attn_implementation
    eff["dataset_columns"] = trainer.train_dataset.column_names
    return eff


# ---------------------------------------------------------------------------------------------------------------
# reference packing (plain Python), asserted equal to trl.data_utils.pack_dataset
# ---------------------------------------------------------------------------------------------------------------

def ref_pack_bfd(examples, seq_length, split):
    """examples: list of {"input_ids", "labels"} (one `datasets.map` batch, <= 1000 rows).

    Returns packed rows with `seq_lengths` and `sources` [(source_row, start, end)] in the source's token offsets.
    """
    # 1. documents: drop empty rows; truncate to seq_length ("bfd") or cut into seq_length fragments ("bfd_split").
    #    A split row of length n gives ceil(n/L) fragments, all of length L except the last (n - (k-1)L).
    docs = []  # (source_row, start, end), in source order (fragments of one row consecutive)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n == 0:
            continue
        if split:
            for start in range(0, n, seq_length):
                docs.append((i, start, min(start + seq_length, n)))
        else:
            docs.append((i, 0, min(n, seq_length)))
    # 2. stable sort by length, descending (pyarrow sort_indices is stable: ties keep document order)
    order = sorted(range(len(docs)), key=lambda d: -(docs[d][2] - docs[d][1]))
    # 3. best fit: put each doc in the open bin with the SMALLEST remaining space >= its length; among bins with that
    #    same remaining space, the one that reached it first (FIFO). A full-size (empty) bin always exists: if the best
    #    fit is `seq_length` itself, open a new bin at the end of the bin list.
    bins = []  # each: {"docs": [...], "space": int, "stamp": int}
    stamp = 0
    for d in order:
        length = docs[d][2] - docs[d][1]
        candidates = [b for b in bins if b["space"] >= length]
        if candidates:
            best_space = min(b["space"] for b in candidates)
            b = min((b for b in candidates if b["space"] == best_space), key=lambda b: b["stamp"])
        else:
            b = {"docs": [], "space": seq_length, "stamp": 0}
            bins.append(b)
        b["docs"].append(d)
        b["space"] -= length
        stamp += 1
        b["stamp"] = stamp  # time the bin got its current remaining space
    rows = []
    for b in bins:
        ids, labels, lens, sources = [], [], [], []
        for d in b["docs"]:
            i, s, e = docs[d]
            ids += examples[i]["input_ids"][s:e]
            labels += examples[i]["labels"][s:e]
            lens.append(e - s)
            sources.append({"source_row": i, "start": s, "end": e})
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": lens, "sources": sources})
    return rows


def ref_pack_wrapped(examples, seq_length):
    """Concatenate every row of the batch, cut every seq_length tokens; the last chunk may be shorter."""
    ids, labels, owner = [], [], []
    for i, ex in enumerate(examples):
        ids += ex["input_ids"]
        labels += ex["labels"]
        owner += [(i, t) for t in range(len(ex["input_ids"]))]
    rows = []
    for s in range(0, len(ids), seq_length):
        chunk_owner = owner[s:s + seq_length]
        sources = []
        for i, t in chunk_owner:
            if sources and sources[-1]["source_row"] == i:
                sources[-1]["end"] = t + 1
            else:
                sources.append({"source_row": i, "start": t, "end": t + 1})
        rows.append({"input_ids": ids[s:s + seq_length], "labels": labels[s:s + seq_length], "sources": sources})
    return rows


def ref_position_ids(seq_lengths_per_row):
    return [[p for n in lens for p in range(n)] for lens in seq_lengths_per_row]


# ---------------------------------------------------------------------------------------------------------------
# 1. packing
# ---------------------------------------------------------------------------------------------------------------

def source_examples(rows, tmp):
    """Per row, the tokenization SFTTrainer packs: with packing, truncation is skipped, so this is the untruncated
    `input_ids`/`labels` (checked against a packing=False, max_length=None trainer)."""
    trainer = make_trainer(rows, tmp, max_length=None)
    ds = trainer.train_dataset
    return [{"row": i, "input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(len(ds))]


def collated(trainer, indices):
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in indices])
    return {k: to_py(v) for k, v in batch.items()}


def write_packing():
    summary = {}
    for name, path in DATASETS.items():
        rows = read_jsonl(path)
        with tempfile.TemporaryDirectory() as tmp:
            sources = source_examples(rows, tmp)
        write_json(OUT / f"sources_{name}.json", {
            "trl_version": trl.__version__, "dataset": str(path), "tokenizer": "chatml",
            "note": "untruncated input_ids/labels per source row, the input of pack_dataset",
            "examples": sources,
        })
        src = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in sources]
        for strategy in STRATEGIES:
            for max_length in MAX_LENGTHS:
                config = {"packing": True, "packing_strategy": strategy, "max_length": max_length}
                with tempfile.TemporaryDirectory() as tmp:
                    trainer = make_trainer(rows, tmp, **config)
                    ds = trainer.train_dataset
                    packed = [{k: ds[i][k] for k in ds.column_names} for i in range(len(ds))]
                    batch = collated(trainer, [0, 1])
                    eff = effective_config(trainer)
                if strategy == "wrapped":
                    ref = ref_pack_wrapped(src, max_length)
                else:
                    ref = ref_pack_bfd(src, max_length, split=strategy == "bfd_split")
                assert len(ref) == len(packed), (name, strategy, max_length, len(ref), len(packed))
                out_rows = []
                for j, (p, r) in enumerate(zip(packed, ref)):
                    assert p["input_ids"] == r["input_ids"], (name, strategy, max_length, j)
                    assert p["labels"] == r["labels"], (name, strategy, max_length, j)
                    entry = {"row": j, "input_ids": p["input_ids"], "labels": p["labels"]}
                    if "seq_lengths" in p:
                        assert p["seq_lengths"] == r["seq_lengths"], (name, strategy, max_length, j)
                        entry["seq_lengths"] = p["seq_lengths"]
                        entry["position_ids"] = ref_position_ids([p["seq_lengths"]])[0]  # what the collator builds
                    entry["sources"] = r["sources"]
                    out_rows.append(entry)
                # The collator on rows 0 and 1
                if strategy == "wrapped":
                    assert "attention_mask" in batch and "position_ids" not in batch
                else:
                    assert "attention_mask" not in batch
                    flat = packed[0]["seq_lengths"] + packed[1]["seq_lengths"]
                    pos = [p for n in flat for p in range(n)]
                    assert batch["position_ids"] == [pos]
                    lab = packed[0]["labels"] + packed[1]["labels"]
                    assert batch["labels"] == [[-100 if q == 0 else l for q, l in zip(pos, lab)]]
                out = {
                    "trl_version": trl.__version__,
                    "dataset": str(path),
                    "tokenizer": "chatml",
                    "model": "models/qwen2",
                    "sft_config": config,
                    "config": eff,
                    "num_source_rows": len(rows),
                    "num_packed_rows": len(out_rows),
                    "packed": out_rows,
                    "collated_rows": [0, 1],
                    "collated_keys": list(batch.keys()),
                    "collated": batch,
                }
                fname = f"expected_{name}_{strategy}_{max_length}.json"
                write_json(OUT / fname, out)
                summary[fname] = {"packed_rows": len(out_rows),
                                  "seq_lengths": [r.get("seq_lengths") for r in out_rows]}
                print(f"trl_packing/{fname}: {len(rows)} -> {len(out_rows)} rows, keys {list(batch.keys())}")
    check_tie_breaking()
    return summary


def check_tie_breaking():
    """The BFD details the datasets above may not hit: ties in length, FIFO among equal-space bins, empty rows."""
    from trl.data_utils import pack_dataset
    cases = [
        ([3, 3, 2, 2, 1, 1, 4], 4),
        ([2, 2, 2, 2, 2], 5),
        ([1, 5, 1, 3, 0, 2, 2, 6, 4], 6),
        ([7, 3, 10, 1, 1, 1], 4),
    ]
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 12)
        lengths = [rng.randint(0, 2 * L) for _ in range(rng.randint(1, 25))]
        cases.append((lengths + [rng.randint(1, 2 * L)], L))  # at least one non-empty row (else pyarrow null type)
    for lengths, L in cases:
        base = 0
        exs = []
        for n in lengths:
            exs.append({"input_ids": list(range(base, base + n)), "labels": list(range(base, base + n))})
            base += 100
        for split in (False, True):
            got = pack_dataset(Dataset.from_list(exs), L, "bfd_split" if split else "bfd")[:]
            ref = ref_pack_bfd(exs, L, split)
            assert got["input_ids"] == [r["input_ids"] for r in ref], (lengths, L, split)
            assert got["seq_lengths"] == [r["seq_lengths"] for r in ref], (lengths, L, split)


# ---------------------------------------------------------------------------------------------------------------
# 2. per-token loss: packed batch vs each document alone
# ---------------------------------------------------------------------------------------------------------------

def per_token_from_logits(logits, labels):
    """Label-aligned per-token CE: out[i] = -log p(labels[i] | logits at i-1), 0 where labels[i] == -100, out[0] = 0."""
    logits = logits.float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = labels[1:]
    mask = tgt != -100
    nll = -lp.gather(-1, tgt.clamp(min=0)[:, None])[:, 0]
    out = torch.zeros(labels.shape[0], dtype=torch.float32)
    out[1:] = torch.where(mask, nll, torch.zeros_like(nll))
    return out


def write_loss():
    rows = read_jsonl(DATASETS["qa_chat"])
    config = {"packing": True, "packing_strategy": "bfd", "max_length": 128}
    results = {}
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(rows, tmp, attn_implementation="eager", **config)
        ds = trainer.train_dataset
        # the two packed rows that hold two documents each (67+61 and 65+63 tokens): 4 documents, 256 tokens
        rows_used = [i for i in range(len(ds)) if len(ds[i]["seq_lengths"]) > 1]
        assert len(rows_used) == 2, rows_used
        batch = trainer.data_collator([ds[i] for i in rows_used])
        input_ids, position_ids, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        L = input_ids.shape[1]
        model = trainer.model  # carries TRL's fused LM head (trl.trainer.utils.add_fused_lm_head)
        model.train()  # as in training; dropout is 0 in this config
        with torch.no_grad():
            # (a) exactly the trainer's compute_loss forward: model(**inputs, use_cache=False, fused_lm_head=True)
            inputs = dict(batch)
            inputs["use_cache"] = False
            fused = model(**inputs, fused_lm_head=True)
            trainer_ptl = torch.zeros(L)
            trainer_ptl[1:] = -fused.log_probs[0]
            trainer_loss = float(fused.loss)
            # (b) the plain HF forward with the trainer's packed inputs (no attention_mask), eager and sdpa
            def logits_for(impl, **kw):
                model.set_attn_implementation(impl)
                assert model.config._attn_implementation == impl
                return model(input_ids=input_ids, use_cache=False, **kw).logits[0]
            packed_eager = per_token_from_logits(logits_for("eager", position_ids=position_ids), labels[0])
            packed_sdpa = per_token_from_logits(logits_for("sdpa", position_ids=position_ids), labels[0])
            # (c) every document alone (positions 0..n-1), labels of that document, concatenated
            model.set_attn_implementation("eager")
            starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [L]
            separate = []
            for s, e in zip(starts[:-1], starts[1:]):
                doc_logits = model(input_ids=input_ids[:, s:e], use_cache=False).logits[0]
                separate.append(per_token_from_logits(doc_logits, labels[0, s:e]))
            separate = torch.cat(separate)
            # (d) boundaries ignored: plain causal attention over the whole row, continuous positions 0..L-1
            no_boundaries = per_token_from_logits(logits_for("eager"), labels[0])
            # (e) position_ids given with use_cache=True (a fresh model's config default; the Trainer overwrites
            #     model.config.use_cache with args.use_cache=False): transformers then builds a DynamicCache, and
            #     `_preprocess_mask_arguments` skips packed-sequence detection when a cache exists
            model.set_attn_implementation("eager")
            with_cache = per_token_from_logits(
                model(input_ids=input_ids, position_ids=position_ids, use_cache=True).logits[0], labels[0])
            # (f) position_ids given together with an all-ones attention_mask: detection is skipped as well
            with_mask = per_token_from_logits(
                model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                      use_cache=False).logits[0], labels[0])
            # (g) the model's own loss with the packed inputs (mean over the valid labels)
            hf_loss = float(model(input_ids=input_ids, position_ids=position_ids, labels=labels,
                                  use_cache=False).loss)
    valid = labels[0] != -100
    def maxdiff(a, b):
        return float((a - b).abs().max())
    results = {
        "layout": "all per_token_loss_* are f32 [L], label-aligned: [i] = -log p(input_ids[i] | the tokens of its "
                  "document before i) where labels[0, i] != -100, else 0 ([0] and every document start are 0)",
        "config": config, "collated_rows": rows_used, "length": L, "documents": len(starts) - 1,
        "doc_starts": starts[:-1], "num_valid_labels": int(valid.sum()),
        "max_abs_diff": {
            "packed_eager_vs_separate": maxdiff(packed_eager, separate),
            "packed_sdpa_vs_separate": maxdiff(packed_sdpa, separate),
            "trainer_fused_vs_separate": maxdiff(trainer_ptl, separate),
            "no_boundaries_vs_separate": maxdiff(no_boundaries, separate),
            "use_cache_true_vs_separate": maxdiff(with_cache, separate),
            "ones_attention_mask_vs_separate": maxdiff(with_mask, separate),
        },
        "mean_loss": {
            "separate": float(separate.sum() / valid.sum()),
            "trainer_fused": trainer_loss,
            "hf_model_loss_packed": hf_loss,
        },
    }
    # first document is unaffected by the others in every variant; the differences sit in later documents
    tensors = {
        "input_ids": input_ids.contiguous(),
        "position_ids": position_ids.contiguous(),
        "labels": labels.contiguous(),
        "per_token_loss_packed": packed_eager.contiguous(),
        "per_token_loss_packed_sdpa": packed_sdpa.contiguous(),
        "per_token_loss_trainer": trainer_ptl.contiguous(),
        "per_token_loss_separate": separate.contiguous(),
        "per_token_loss_no_boundaries": no_boundaries.contiguous(),
    }
    save_file(tensors, OUT / "loss_qa_chat_bfd_128.safetensors")
    os.chmod(OUT / "loss_qa_chat_bfd_128.safetensors", 0o644)
    write_json(OUT / "loss_qa_chat_bfd_128.json", results)
    print("trl_packing/loss_qa_chat_bfd_128:", json.dumps(results["max_abs_diff"]))
    return results


# ---------------------------------------------------------------------------------------------------------------
# 3. assistant-only loss with a {% generation %} template
# ---------------------------------------------------------------------------------------------------------------

def write_assistant_only():
    GEN_TEMPLATE.write_text(CHATML_GENERATION_TEMPLATE)  # no trailing newline, like the original template
    tok = tokenizer()
    template = GEN_TEMPLATE.read_text()
    rows = read_jsonl(DATASETS["messages"])
    # The generation template renders exactly like the original
    for r in rows + read_jsonl(DATASETS["qa_chat"]):
        for agp in (False, True):
            a = tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=agp)
            b = tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=agp, chat_template=template)
            assert a == b
    existing = json.loads((FIX / "trl" / "expected_messages_chatml.json").read_text())
    results = {}
    for suffix, config in {"": {"max_length": 1024},
                           "_maxlen12": {"max_length": 12},
                           "_packed_bfd_64": {"max_length": 64, "packing": True}}.items():
        config = {"assistant_only_loss": True, "chat_template_path": str(GEN_TEMPLATE), **config}
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(rows, tmp, **config)
            from trl.chat_template_utils import is_chat_template_stop_token_trained
            stop_trained = is_chat_template_stop_token_trained(trainer.processing_class)
            ds = trainer.train_dataset
            eff = effective_config(trainer)
            eff["is_chat_template_stop_token_trained"] = stop_trained
            examples = []
            if not config.get("packing"):
                k = 0  # next train_dataset row: rows with no label left after truncation are dropped, in order
                for i, r in enumerate(rows):
                    # the mask TRL computes (tokenize_fn -> trl.data_utils._tokenize), before build_labels drops it
                    proc = _tokenize(trainer.processing_class, r["messages"], return_assistant_tokens_mask=True,
                                     chat_template=None, tools=None)
                    ids, mask = proc["input_ids"], proc["assistant_masks"]
                    if suffix == "":
                        assert ids == existing["examples"][i]["input_ids"]
                    n = config["max_length"]
                    full_labels = [t if m else -100 for t, m in zip(ids, mask)]
                    dropped = all(x == -100 for x in full_labels[:n])
                    if not dropped:
                        assert ds[k]["input_ids"] == ids[:n]
                        assert ds[k]["labels"] == full_labels[:n]
                        batch = trainer.data_collator([ds[k]])
                        assert batch["labels"][0].tolist() == full_labels[:n]
                        assert batch["input_ids"][0].tolist() == ids[:n]
                        k += 1
                    spans = []
                    for t, m in enumerate(mask):
                        if m and (t == 0 or not mask[t - 1]):
                            spans.append([t, t])
                        if m:
                            spans[-1][1] = t + 1
                    examples.append({
                        "row": i,
                        "dropped": dropped,
                        "input_ids": None if dropped else ids[:n],
                        "assistant_masks": None if dropped else mask[:n],
                        "labels": None if dropped else full_labels[:n],
                        "untruncated_length": len(ids),
                        "assistant_spans": spans,
                        "assistant_text": [tok.decode(ids[s:e]) for s, e in spans],
                    })
                assert k == len(ds)
            else:
                for j in range(len(ds)):
                    examples.append({"row": j, "input_ids": ds[j]["input_ids"], "labels": ds[j]["labels"],
                                     "seq_lengths": ds[j]["seq_lengths"]})
                batch = {k: to_py(v) for k, v in trainer.data_collator([ds[j] for j in range(min(2, len(ds)))]).items()}
        out = {
            "trl_version": trl.__version__,
            "dataset": str(DATASETS["messages"]),
            "tokenizer": "chatml",
            "chat_template": str(GEN_TEMPLATE),
            "model": "models/qwen2",
            "sft_config": config,
            "config": eff,
            "examples": examples,
        }
        if config.get("packing"):
            out["collated_rows"] = list(range(min(2, len(ds))))
            out["collated"] = batch
        fname = f"expected_messages_chatml_generation_assistant_only{suffix}.json"
        write_json(OUT / fname, out)
        results[fname] = len(examples)
        print(f"trl_packing/{fname}: {len(examples)} rows")
    return results


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.glob("*"):
        p.unlink()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                "datasets": datasets.__version__, "pyarrow": pyarrow.__version__,
                "python": sys.version.split()[0]}
    write_assistant_only()
    write_packing()
    write_loss()
    (OUT / "VERSIONS.txt").write_text("".join(f"{k} {v}\n" for k, v in versions.items()))


if __name__ == "__main__":
    main()
