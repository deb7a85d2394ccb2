#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_spm/: a tiny Llama GGUF with a SentencePiece vocabulary, and what transformers
makes of it.

Run from the repo root: `python scripts/make_spm_gguf_fixture.py` (needs `pip install sentencepiece`).
Deterministic and offline: two runs give byte-identical files.

1. Trains a SentencePiece BPE model on CORPUS below (one thread, fixed seed, in a temp dir) with Llama 2's
   trainer options (identity normalization, dummy prefix, extra whitespace kept, digits split,
   whitespace-only pieces allowed, byte fallback), `character_coverage=1.0`, VOCAB_SIZE pieces,
   `<unk>` 0 / `<s>` 1 / `</s>` 2, and one user-defined symbol `<tool>` (id 3).
2. model.gguf: `gguf.GGUFWriter(path, "llama")`. Tokenizer metadata as llama.cpp's convert_hf_to_gguf.py
   `_set_vocab_sentencepiece` writes it: `tokenizer.ggml.model` "llama", `.pre` "default", tokens = the
   pieces by id, scores = `GetScore(id)`, token types from IsUnknown/IsControl/IsUnused/IsByte (2/3/5/6),
   USER_DEFINED (4) read from the model proto's piece type (the SentencePiece API has no IsUserDefined),
   NORMAL (1) otherwise; then `gguf.SpecialVocab` on a stub HF dir (config.json with bos/eos ids,
   tokenizer_config.json with add_bos_token true, add_eos_token false, the chat template, and a tokenizer.json
   holding only `added_tokens`, which is where SpecialVocab finds the unk id): bos 1, eos 2, unk 0,
   add_bos_token, add_eos_token, chat_template (Llama-2 style, CHAT_TEMPLATE). Plus
   `tokenizer.ggml.add_space_prefix` true. Hparams: 1 block, ctx 128, embd 32, ffn 64, 2 heads, 2 KV heads,
   rope dims 16, rms eps 1e-6, vocab_size. Tensors f32, N(0, 0.02^2) (seed 0), norms ones, given to
   add_tensor as numpy [out, in] (GGUF stores the dims reversed). The q/k weights are random, so they are not
   run through convert's rotary permutation; transformers un-permutes attn_q/attn_k on load regardless.
3. reference.json, from `AutoTokenizer.from_pretrained(dir, gguf_file="model.gguf")`:
  versions        transformers, tokenizers, sentencepiece, gguf, torch, python; the GGUF's sha256
  vocab_size      pieces in the SentencePiece model (= GGUF token count)
  token_types     llama.cpp token type -> ids (all ids except for NORMAL, which gets a count)
  special         bos/eos/unk/pad tokens and ids as transformers reports them, add_bos_token, add_eos_token,
                  len(tok), the added tokens (id, content, special)
  backend         json.loads(tok.backend_tokenizer.to_str()) with model.vocab and model.merges replaced by
                  their lengths
  cases           [{text, ids, decoded}]: `tok(text).input_ids` (add_special_tokens=True, the default) and
                  `tok.decode(ids, skip_special_tokens=False)` for TEXTS, and `sentencepiece_ids`:
                  `sp.encode(text)` from the trained model itself (no BOS; `<s>`/`</s>` in the text are
                  plain characters to it); `sp_differs`: whether `ids` minus the leading BOS differ from them
  chat            apply_chat_template(CHAT) text and ids (tokenize=True, so add_special_tokens=False)
  model           whether `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads it; if so, the
                  last-position logits for `model_input_ids` (f32, eager attention)
Written with transformers 5.24.0, tokenizers 0.23.3, sentencepiece 0.2.3, gguf 0.19.0, torch 2.15.0
(Python 3.11).
"""
import hashlib
import json
import os
import platform
import shutil
import struct
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf
import numpy as np
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path("tests/fixtures/gguf_spm")
GGUF_NAME = "model.gguf"
VOCAB_SIZE = 400

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A tiny model can still learn a few useful pieces of text.
She sold 12 sea shells by the sea shore, then 34 more on Monday.
"Hello, world!" said the programmer, and the world said nothing back.
Is this the real life? Is this just fantasy?
We met at the café on Rue de Rivoli at 9:30 in the morning.
It would be naïve to think that one test is enough.
Tokyo is the capital of 日本, and Kyoto was the capital before it.
Prices rose by 3.5% in 2023, and by another 2.1% in 2024.
Please call <tool> when you need the weather, then answer the question.
The assistant used <tool> twice and then wrote a short answer.
Rust is a systems programming language; Python is a scripting language.
Fine-tuning with LoRA adds two small matrices to each linear layer.
The learning rate was 0.0002, the batch size was 8, and training took 3 hours.
Why do cats sit on keyboards? Nobody knows, but they always do.
He said: "Don't stop; keep going -- we're almost there!"
Add the flour, then the sugar, then the eggs (two of them).
Line one ends here.	A tab separates this part.
Numbers like 1, 22, 333 and 4444 appear in the data.
The file was saved as model_v2.bin at 10:45 PM.
In the beginning the model knew nothing at all.
Every token has an id, and every id has a piece.
Questions and answers: what is 7 times 6? It is 42.
The river flows north for about 600 kilometres.
Good morning! Good afternoon! Good evening!
They tried, they failed, they tried again, and they succeeded.
Email me at someone@example.com or visit https://example.com/page?id=5.
A café, a naïve idea, a résumé, and a façade walked into a bar.
The weather today is sunny with a high of 25 degrees.
Mathematics: 2 + 2 = 4, 3 * 3 = 9, 10 / 2 = 5.
The library opens at 8 and closes at 20 on weekdays.
Small steps, repeated often, make large changes over time.
"Where are you going?" she asked. "Home," he replied.
The old house on the hill had seven windows and one door.
Training data should be clean, varied and representative.
Our team shipped version 1.4.2 last Friday; version 1.5 is next.
Spaces  between  words  sometimes  come  in  pairs.
The end of the story is also the beginning of another one.
"""

# Llama 2's tokenizer.model trainer_spec, as far as it matters at this size.
TRAINER = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    max_sentence_length=4192,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    user_defined_symbols=["<tool>"],
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
)

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHAT = [
    {"role": "system", "content": "You are a tiny model."},
    {"role": "user", "content": "What is 7 times 6?"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "Thanks!"},
]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces",
    "line one\nline two\n\nline four",
    "\n",
    "a\ttab\tseparated",
    "Numbers: 0 7 42 2024 3.14159 -17",
    "Wait... what?!?! (yes) [no] {maybe} --- ***",
    "Zebras quizzically vexed jumpy wolves",
    "xylophone juxtaposition",
    "café naïve 日本",
    "Ω",
    "🙂 ok",
    "Привет, мир",
    "call <tool> now",
    "<tool>",
    "<tool><tool>x",
    "before <s> middle </s> after",
    "<s>",
    "</s>",
    "<unk>",
    "",
    " ",
    "Ünïcödé ß ø 中文",
]

TOKEN_TYPE_NAMES = {int(t): t.name for t in gguf.TokenType}


def train_sentencepiece(tmp: Path) -> spm.SentencePieceProcessor:
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp / "tokenizer"), **TRAINER)
    return spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))


def proto_piece_types(model: bytes) -> list[int]:
    """The `type` of each piece in a serialized sentencepiece ModelProto (field 1, SentencePiece; its field 3).

    A minimal protobuf wire-format reader, so the script needs no protobuf package. SentencePiece's Type
    enum (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) has llama.cpp's numbering."""

    def varint(buf, i):
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                raise ValueError(f"unexpected wire type {wire}")
            yield num, value

    types = []
    for num, value in fields(model):
        if num == 1:
            piece_type = 1  # the proto default
            for sub, sub_value in fields(value):
                if sub == 3:
                    piece_type = sub_value
            types.append(piece_type)
    return types


def llama_cpp_vocab(sp: spm.SentencePieceProcessor):
    """convert_hf_to_gguf.py `_create_vocab_sentencepiece`, the SentencePiece part."""
    proto_types = proto_piece_types(sp.serialized_model_proto())
    assert len(proto_types) == sp.vocab_size()
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        t = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        elif proto_types[i] == gguf.TokenType.USER_DEFINED:
            t = gguf.TokenType.USER_DEFINED
        assert proto_types[i] == int(t), (i, sp.IdToPiece(i), proto_types[i], t)
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(int(t))
    return tokens, scores, types


def special_vocab(tmp: Path, n_vocab: int) -> gguf.SpecialVocab:
    """gguf.SpecialVocab as convert_hf_to_gguf.py builds it, from a stub of a Llama 2 HF directory."""
    hf = tmp / "hf"
    hf.mkdir()
    specials = [(0, "<unk>"), (1, "<s>"), (2, "</s>")]
    (hf / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
    }))
    (hf / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": i, "content": c, "special": True} for i, c in specials],
    }))
    sv = gguf.SpecialVocab(hf, n_vocab=n_vocab)
    assert sv.special_token_ids == {"bos": 1, "eos": 2, "unk": 0}, sv.special_token_ids
    assert sv.add_special_token == {"bos": True, "eos": False}, sv.add_special_token
    assert sv.chat_template == CHAT_TEMPLATE
    return sv


def tensors(n_vocab: int) -> dict[str, np.ndarray]:
    """Llama tensors in GGUF names, numpy [out, in] as in HF."""
    d, ff, heads, kv_heads = 32, 64, 2, 2
    head_dim = d // heads
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    out = {"token_embd.weight": w(n_vocab, d)}
    out |= {
        "blk.0.attn_norm.weight": np.ones(d, np.float32),
        "blk.0.attn_q.weight": w(heads * head_dim, d),
        "blk.0.attn_k.weight": w(kv_heads * head_dim, d),
        "blk.0.attn_v.weight": w(kv_heads * head_dim, d),
        "blk.0.attn_output.weight": w(d, heads * head_dim),
        "blk.0.ffn_norm.weight": np.ones(d, np.float32),
        "blk.0.ffn_gate.weight": w(ff, d),
        "blk.0.ffn_up.weight": w(ff, d),
        "blk.0.ffn_down.weight": w(d, ff),
    }
    out |= {"output_norm.weight": np.ones(d, np.float32), "output.weight": w(n_vocab, d)}
    return out


def write_gguf(path: Path, tmp: Path, sp: spm.SentencePieceProcessor):
    tokens, scores, types = llama_cpp_vocab(sp)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-spm-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # _set_vocab_sentencepiece
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special_vocab(tmp, len(tokens)).add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(True)
    for name, array in tensors(len(tokens)).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def backend_summary(tok) -> dict:
    backend = json.loads(tok.backend_tokenizer.to_str())
    backend["model"]["vocab"] = len(backend["model"]["vocab"])
    backend["model"]["merges"] = len(backend["model"]["merges"])
    return backend


def model_probe(tok) -> dict:
    try:
        model = AutoModelForCausalLM.from_pretrained(OUT, gguf_file=GGUF_NAME, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    except Exception as e:  # recorded, not fatal: the tokenizer is what this fixture is for
        return {"loads": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    ids = tok("The quick brown fox").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return {
        "loads": True,
        "class": type(model).__name__,
        "config": {k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")},
        "model_input_ids": ids,
        "last_logits": [float(x) for x in logits],
    }


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sp = train_sentencepiece(tmp)
        types = write_gguf(OUT / GGUF_NAME, tmp, sp)

    tok = AutoTokenizer.from_pretrained(OUT, gguf_file=GGUF_NAME)
    cases = []
    for text in TEXTS:
        ids = tok(text).input_ids
        case = {"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)}
        case["sentencepiece_ids"] = sp.encode(text)
        case["sp_differs"] = ids[1:] != case["sentencepiece_ids"]
        cases.append(case)
    chat_text = tok.apply_chat_template(CHAT, tokenize=False)
    chat_ids = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]

    by_type = {}
    for i, t in enumerate(types):
        by_type.setdefault(TOKEN_TYPE_NAMES[t], []).append(i)
    by_type["NORMAL"] = len(by_type.get("NORMAL", []))

    reference = {
        "versions": {
            "transformers": version("transformers"), "tokenizers": version("tokenizers"),
            "sentencepiece": version("sentencepiece"), "gguf": version("gguf"), "torch": version("torch"),
            "python": platform.python_version(),
            "gguf_sha256": hashlib.sha256((OUT / GGUF_NAME).read_bytes()).hexdigest(),
        },
        "vocab_size": sp.vocab_size(),
        "token_types": by_type,
        "special": {
            **{f"{name}_token": getattr(tok, f"{name}_token") for name in ("bos", "eos", "unk", "pad")},
            **{f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")},
            "add_bos_token": tok.add_bos_token, "add_eos_token": tok.add_eos_token,
            "len": len(tok),
            "added_tokens": [{"id": i, "content": t.content, "special": t.special}
                             for i, t in sorted(tok.added_tokens_decoder.items())],
            "chat_template": tok.chat_template,
        },
        "backend": backend_summary(tok),
        "cases": cases,
        "chat": {"messages": CHAT, "text": chat_text, "ids": chat_ids},
        "model": model_probe(tok),
    }
    with open(OUT / "reference.json", "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for name in (GGUF_NAME, "reference.json"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
