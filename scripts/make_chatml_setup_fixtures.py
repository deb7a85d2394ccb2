#!/usr/bin/env python3
"""Writes tests/fixtures/chatml_setup/: a base model without a chat template, TRL's ChatML setup of it, and a
PEFT adapter (LoRA + trainable rows for the two new tokens) over the set-up model.

Run from the repo root: `python scripts/make_chatml_setup_fixtures.py`. Deterministic (fixed seeds, CPU, f32, one
torch thread): two runs give byte-identical files. Offline. Reuses the corpus, the weight re-draw and the Llama
shapes of scripts/make_reference_fixtures.py. Writes only tests/fixtures/chatml_setup/ (see
tests/fixtures/README.md, section `chatml_setup/`).

TRL 1.16 no longer has `setup_chat_format` (deprecated in 0.24/0.25, removed in 0.26.0; 0.25.1 is the last release
with it); `setup_chat_format` below is its code as of TRL 0.19.0–0.25.1 (identical logic in all of them),
applied with transformers 5.23.

Outputs:
  base/                     LlamaForCausalLM (f32, vocab 400, untied) + byte-level BPE tokenizer whose only
                            special token is <|endoftext|> (bos = eos, no pad, no chat template)
  after_setup_tokenizer/    the tokenizer after setup_chat_format, as save_pretrained writes it
  setup.json                vocab sizes, new token ids, special tokens/ids of tokenizer, config and
                            generation_config after the setup, the template, the rendered conversation
  peft_adapter/             PeftModel.save_pretrained (LoRA r=4 all-linear + trainable_token_indices for
                            embed_tokens and lm_head, save_embedding_layers=False) + the set-up tokenizer
  expected.safetensors      input_ids [1, T], logits [1, T, 402] of the PEFT model, loss, grads, resize stats
"""
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# PEFT writes `target_modules` in set order: fix Python's string hashing so adapter_config.json is reproducible.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # noqa: E402  (corpus, randomize, COMMON, MODELS, save_tokenizer)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast  # noqa: E402

OUT = Path("tests/fixtures/chatml_setup")
BASE, AFTER, ADAPTER = OUT / "base", OUT / "after_setup_tokenizer", OUT / "peft_adapter"
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

EOT = "<|endoftext|>"
RESIZE_SEED = 42      # resize_token_embeddings(mean_resizing=True) samples the new rows from the global RNG
LORA_INIT_SEED = 3    # PEFT's lora_A init
LORA_B_SEED = 99      # lora_B := N(0, 0.1^2)
TOKENS_SEED = 98      # new token rows := N(0, 0.2^2) (the scale of every other row of randomize())

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What do bees make?"},
    {"role": "assistant", "content": "Honey."},
    {"role": "user", "content": "What is frozen water called?"},
    {"role": "assistant", "content": "Ice."},
]


# ---------------------------------------------------------------------------------------------------------------
# TRL 0.19.0–0.25.1 `trl/models/utils.py`: ChatMlSpecialTokens + setup_chat_format (logic copied unchanged)
# ---------------------------------------------------------------------------------------------------------------

class ChatMlSpecialTokens:
    bos_token = "<|im_start|>"
    eos_token = "<|im_end|>"
    pad_token = "<|im_end|>"

    @property
    def assistant(self):
        return f"{self.bos_token}assistant"

    @property
    def chat_template(self):
        # Note: in TRL's source the '\n' below are inside a Python f-string, so the template holds real newline
        # characters inside its Jinja string literals (not backslash-n escapes).
        return (
            "{% for message in messages %}"
            f"{{{{'{self.bos_token}' + message['role'] + '\n' + message['content'] + '{self.eos_token}' + '\n'}}}}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            f"{{{{ '{self.assistant}\n' }}}}"
            "{% endif %}"
        )


def setup_chat_format(model, tokenizer, resize_to_multiple_of=None):
    if tokenizer.chat_template is not None:
        raise ValueError("Chat template is already added to the tokenizer.")
    chat_format = ChatMlSpecialTokens()
    tokenizer.eos_token = chat_format.eos_token
    tokenizer.pad_token = chat_format.pad_token
    tokenizer.bos_token = chat_format.bos_token
    tokenizer.add_special_tokens({"additional_special_tokens": [chat_format.bos_token, chat_format.eos_token]})
    tokenizer.chat_template = chat_format.chat_template
    model.resize_token_embeddings(
        new_num_tokens=len(tokenizer.vocab),
        pad_to_multiple_of=resize_to_multiple_of if resize_to_multiple_of is not None else None,
    )
    if getattr(model, "config", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------

def make_base_tokenizer():
    """GPT-2 style: byte-level BPE, vocab 400, <|endoftext|> (id 0) is the only special token, bos = eos, no pad,
    no BOS added by the post-processor, no chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(ref.corpus(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)


def write_base():
    fast = make_base_tokenizer()
    ref.save_tokenizer(fast, BASE)
    tok = AutoTokenizer.from_pretrained(BASE)
    assert len(tok) == 400 and tok.chat_template is None and tok.pad_token is None, (len(tok), tok.pad_token)
    assert tok.bos_token_id == tok.eos_token_id == 0
    assert "<|im_start|>" not in tok.get_vocab() and "<|im_end|>" not in tok.get_vocab()
    assert not (BASE / "chat_template.jinja").exists()

    extra = ref.MODELS["llama"][3]
    config = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=None,
                                      **ref.COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ref.randomize(model)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0)
    model.save_pretrained(BASE, safe_serialization=True)


def load_base():
    return AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager").eval()


def peft_key(param_name):
    return param_name.replace(".default", "")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    write_base()

    # --- TRL's setup -------------------------------------------------------------------------------------------
    tok = AutoTokenizer.from_pretrained(BASE)
    model = load_base()
    old_embed = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    torch.manual_seed(RESIZE_SEED)
    model, tok = setup_chat_format(model, tok)
    ref.save_tokenizer(tok, AFTER)
    new_ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    vocab = model.config.vocab_size
    assert new_ids == [400, 401] and vocab == len(tok) == 402, (new_ids, vocab, len(tok))
    embed_rows = model.get_input_embeddings().weight[new_ids].detach().clone()
    head_rows = model.get_output_embeddings().weight[new_ids].detach().clone()
    assert torch.equal(model.get_input_embeddings().weight[:400], old_embed)
    assert torch.equal(model.get_output_embeddings().weight[:400], old_head)

    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert tok(text)["input_ids"] == ids, "the base post-processor adds no BOS"
    input_ids = torch.tensor([ids])

    reloaded = AutoTokenizer.from_pretrained(AFTER)
    assert reloaded.chat_template == tok.chat_template and reloaded(text)["input_ids"] == ids
    setup = {
        "setup_chat_format_from": "trl 0.19.0-0.25.1 trl/models/utils.py (removed in trl 0.26.0)",
        "resize_to_multiple_of": None,
        "mean_resizing": True,
        "base_vocab_size": 400,
        "resized_vocab_size": vocab,
        "len_tokenizer": len(tok),
        "new_tokens": {"<|im_start|>": new_ids[0], "<|im_end|>": new_ids[1]},
        "added_tokens_special": {a.content: a.special for i, a in sorted(tok.added_tokens_decoder.items())},
        "tokenizer": {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        | {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        | {"extra_special_tokens": list(tok.extra_special_tokens)},
        "base_tokenizer": {"bos_token": EOT, "eos_token": EOT, "pad_token": None, "bos_token_id": 0,
                           "eos_token_id": 0, "pad_token_id": None},
        "model_config": {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                               "vocab_size", "tie_word_embeddings")},
        "generation_config": {k: getattr(model.generation_config, k)
                              for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "chat_template": tok.chat_template,
        "conversation": CONVERSATION,
        "rendered": text,
        "rendered_with_generation_prompt": tok.apply_chat_template(CONVERSATION[:2], tokenize=False,
                                                                   add_generation_prompt=True),
        "input_ids": ids,
    }
    (OUT / "setup.json").write_text(json.dumps(setup, indent=1, ensure_ascii=False) + "\n")

    # --- PEFT: LoRA + trainable rows of the new tokens in embed_tokens and (untied) lm_head -------------------------
    # The set-up model as PEFT sees it: name_or_path is the base folder (what base_model_name_or_path records).
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM",
                           trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids})
    torch.manual_seed(LORA_INIT_SEED)
    pm = peft.get_peft_model(model, lora)
    g_b, g_t = torch.Generator().manual_seed(LORA_B_SEED), torch.Generator().manual_seed(TOKENS_SEED)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g_b) * 0.1)
        for n, p in pm.named_parameters():
            if "trainable_tokens_delta" in n:  # absolute replacement rows, not a difference
                p.copy_(torch.randn(p.shape, generator=g_t) * 0.2)
    pm.eval()
    pm.save_pretrained(ADAPTER, save_embedding_layers=False)
    (ADAPTER / "README.md").unlink(missing_ok=True)  # PEFT's model card boilerplate
    ref.save_tokenizer(tok, ADAPTER)  # as Trainer.save_model does; lets AutoPeftModelForCausalLM resize the base

    labels = input_ids.clone()  # TRL's default for messages: every token is a label
    out = pm(input_ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids,
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
        "resize_mean.embed_tokens": old_embed.mean(0).contiguous(),
        "resize_mean.lm_head": old_head.mean(0).contiguous(),
        "resized_rows.embed_tokens": embed_rows.contiguous(),
        "resized_rows.lm_head": head_rows.contiguous(),
    }
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            grads["grad." + peft_key(n)] = p.grad.detach().contiguous()
    tensors.update(grads)
    saved = load_file(ADAPTER / "adapter_model.safetensors")
    assert set(saved) == {k[len("grad."):] for k in grads}, sorted(set(saved) ^ {k[5:] for k in grads})
    save_file(tensors, OUT / "expected.safetensors")

    check_loading(tensors, saved)
    print(f"chatml_setup: new ids {new_ids}, vocab 400 -> {vocab}, {len(ids)} input ids, loss {out.loss.item():.4f}, "
          f"{len(saved)} adapter tensors; max |resized row - mean|: embed "
          f"{(embed_rows - old_embed.mean(0)).abs().max():.2e}, lm_head {(head_rows - old_head.mean(0)).abs().max():.2e}")


def check_loading(tensors, saved):
    """The user's flows give the same logits; the un-resized base does not load."""
    ids, want = tensors["input_ids"], tensors["logits"]

    def err(model):
        with torch.no_grad():
            return ((model(ids).logits - want).abs().max() / want.abs().max()).item()

    try:
        peft.PeftModel.from_pretrained(load_base(), ADAPTER)
        raise AssertionError("an un-resized base must not load")
    except IndexError:
        pass
    base = load_base()
    base.resize_token_embeddings(402, mean_resizing=False)  # any init: the adapter replaces rows 400, 401
    e1 = err(peft.PeftModel.from_pretrained(base, ADAPTER).eval())
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(ADAPTER, attn_implementation="eager").eval()
    e2 = err(auto)
    e3 = err(auto.merge_and_unload())
    assert e1 == 0.0 and e2 == 0.0 and e3 < 1e-5, (e1, e2, e3)
    # The new rows matter: the same model with the resize's rows instead of the adapter's rows differs.
    plain = load_base()
    torch.manual_seed(RESIZE_SEED)
    plain.resize_token_embeddings(402)
    with tempfile.TemporaryDirectory() as d:
        lora_only = {k: v for k, v in saved.items() if "lora_" in k}
        save_file(lora_only, Path(d) / "adapter_model.safetensors")
        cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
        cfg["trainable_token_indices"] = None
        (Path(d) / "adapter_config.json").write_text(json.dumps(cfg))
        e4 = err(peft.PeftModel.from_pretrained(plain, d).eval())
    assert e4 > 1e-2, e4
    print(f"chatml_setup: resize + PeftModel.from_pretrained {e1:.1e}, AutoPeftModelForCausalLM {e2:.1e}, "
          f"merged {e3:.1e}; without the new rows {e4:.2f}")


if __name__ == "__main__":
    main()
