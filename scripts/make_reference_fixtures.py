#!/usr/bin/env python3
"""Writes the reference fixtures under tests/fixtures/ with the real Python stack.

Run from the repo root: `python scripts/make_reference_fixtures.py`. Deterministic (fixed seeds).
Outputs (all small, committed):
  tokenizers/{chatml,llama3}/            byte-level BPE tokenizers with chat templates
  models/{llama,qwen2,qwen3,smollm3,mistral}/  tiny random models + reference.safetensors
                                         (input_ids int64 [2,16], logits f32 [2,16,V])
  peft/{llama,qwen2}/                    adapter/ (PEFT-written, non-zero B), merged/ (merge_and_unload),
                                         reference.safetensors (input_ids, logits, loss, merged_logits,
                                         grad.<PEFT key> for every LoRA weight)
  train/llama_adamw/                     initial_adapter/, batch.safetensors, steps.json (loss, grad_norm
                                         per step of torch AdamW + clip_grad_norm_), final_adapter/
  trl/<format>.jsonl                     datasets in TRL's four formats
  trl/expected_<format>_<tokenizer>[_<variant>].json
                                         per dataset row, what TRL's SFTTrainer trains on: {"row", "dropped",
                                         "input_ids", "labels"} (labels from its data collator, -100 = no loss)
  trl/rendered_<tokenizer>.json          apply_chat_template(tokenize=False) of each messages row, without and
                                         with add_generation_prompt
"""
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
import peft
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import PreTrainedTokenizerFast

OUT = Path("tests/fixtures")
torch.manual_seed(0)

CORPUS = """The quick brown fox jumps over the lazy dog.
What is the capital of France? Paris is the capital of France.
What colour is the sky on a clear day? Blue.
How many legs does a spider have? Eight legs.
What is two plus two? Four. Which planet is known as the red planet? Mars.
What do bees make? Honey. What is frozen water called? Ice.
How many days are in a week? Seven days. What gas do plants breathe in? Carbon dioxide.
What is the largest ocean? The Pacific Ocean. Who wrote Hamlet? Shakespeare wrote Hamlet.
What is the opposite of hot? Cold. How many hours are in a day? Twenty-four hours.
What animal says moo? A cow. What is the boiling point of water in Celsius? One hundred degrees.
What shape has three sides? A triangle. What is the first letter of the alphabet? A.
Which season comes after winter? Spring. What do you call a baby dog? A puppy.
What is the tallest animal? The giraffe. Question: Answer: user assistant system
You are a helpful AI assistant named SmolLM, trained by Hugging Face.
Hello, how are you today? I am fine, thank you. Can you help me write a poem about the sea?
Café, naïve, über, 東京, emoji 🙂 are all text too.
""" * 4

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def make_tokenizer(name, specials, bos, eos, pad, template, bos_post_processor):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if bos_post_processor:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    path = OUT / "tokenizers" / name
    shutil.rmtree(path, ignore_errors=True)
    fast.save_pretrained(path)
    return fast


TOKENIZERS = {
    "chatml": make_tokenizer(
        "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE, False,
    ),
    "llama3": make_tokenizer(
        "llama3",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE, True,
    ),
}


def randomize(model):
    """Larger-than-default random weights so logits are far from uniform; norms and biases too."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


COMMON = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-6,
)

MODELS = {
    "llama": ("llama3", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_hidden_layers=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("chatml", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen3": ("chatml", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_hidden_layers=2, head_dim=32, tie_word_embeddings=False)),
    "smollm3": ("chatml", transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, dict(
        num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], tie_word_embeddings=True)),
    "mistral": ("llama3", transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_hidden_layers=2, sliding_window=8, tie_word_embeddings=False)),
}


def ids_for(vocab, seed):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def build_model(name):
    tok_name, config_cls, model_cls, extra = MODELS[name]
    tok = TOKENIZERS[tok_name]
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model)
    return model, tok


def write_models():
    for name in MODELS:
        model, tok = build_model(name)
        path = OUT / "models" / name
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        ids = ids_for(len(tok), 7)
        with torch.no_grad():
            logits = model(ids).logits.float().contiguous()
        save_file({"input_ids": ids, "logits": logits}, path / "reference.safetensors")


def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                           task_type="CAUSAL_LM", **kw)


def write_peft():
    for name, extra in [("llama", {}), ("qwen2", {"use_rslora": True})]:
        base = transformers.AutoModelForCausalLM.from_pretrained(OUT / "models" / name, attn_implementation="eager")
        model = peft.get_peft_model(base, lora_config(**extra))
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.eval()
        path = OUT / "peft" / name
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path / "adapter")
        ids = ids_for(base.config.vocab_size, 11)
        labels = ids.clone()
        labels[:, :5] = -100
        out = model(ids, labels=labels)
        out.loss.backward()
        tensors = {"input_ids": ids, "logits": out.logits.detach().float().contiguous(),
                   "loss": out.loss.detach().float().reshape(1)}
        for n, p in model.named_parameters():
            if p.requires_grad:
                key = n.replace(".default", "")
                tensors["grad." + key] = p.grad.detach().contiguous()
        merged = model.merge_and_unload()
        with torch.no_grad():
            tensors["merged_logits"] = merged(ids).logits.float().contiguous()
        merged.save_pretrained(path / "merged", safe_serialization=True)
        save_file(tensors, path / "reference.safetensors")


def write_train_step():
    path = OUT / "train" / "llama_adamw"
    shutil.rmtree(path, ignore_errors=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(OUT / "models" / "llama", attn_implementation="eager")
    torch.manual_seed(5)
    model = peft.get_peft_model(base, lora_config())
    model.save_pretrained(path / "initial_adapter")
    ids = ids_for(base.config.vocab_size, 13)
    labels = ids.clone()
    labels[:, :5] = -100
    save_file({"input_ids": ids, "labels": labels}, path / "batch.safetensors")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps.append({"loss": loss.item(), "grad_norm": norm.item()})
    (path / "steps.json").write_text(json.dumps(steps, indent=1))
    model.save_pretrained(path / "final_adapter")


TRL_DATA = {
    "text": [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "Café, naïve, über: text is text."},
        {"text": "Hello, how are you today? I am fine, thank you."},
    ],
    "messages": [
        {"messages": [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "system", "content": "You answer in one word."},
                      {"role": "user", "content": "What do bees make?"},
                      {"role": "assistant", "content": "Honey."}]},
        {"messages": [{"role": "user", "content": "Hello!"},
                      {"role": "assistant", "content": "Hello, how are you today?"},
                      {"role": "user", "content": "Can you help me write a poem about the sea?"},
                      {"role": "assistant", "content": "Waves over 東京 🙂, the sea sings."}]},
    ],
    "prompt_completion": [
        {"prompt": "Question: What is two plus two?\nAnswer:", "completion": " Four."},
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Translate to German: over", "completion": " über"},
    ],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": "What colour is the sky on a clear day?"}],
         "completion": [{"role": "assistant", "content": "Blue."}]},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Who wrote Hamlet?"}],
         "completion": [{"role": "assistant", "content": "Shakespeare wrote Hamlet."}]},
        {"prompt": [{"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "Hello, how are you today?"},
                    {"role": "user", "content": "What is the tallest animal?"}],
         "completion": [{"role": "assistant", "content": "The giraffe."}]},
    ],
}

TRL_MODELS = {"chatml": "qwen2", "llama3": "llama"}


def trl_process(model_dir, tok, row, **config):
    """What TRL's SFTTrainer trains on for one row: the processed example and the collator's labels."""
    import tempfile
    import warnings
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    warnings.filterwarnings("ignore")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], bf16=False, use_cpu=True, **config)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tok)
        if len(trainer.train_dataset) == 0:
            return {"dropped": True, "input_ids": None, "labels": None}
        example = trainer.train_dataset[0]
        batch = trainer.data_collator([example])
        return {"dropped": False, "input_ids": example["input_ids"], "labels": batch["labels"][0].tolist()}


def write_trl():
    import trl

    path = OUT / "trl"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for fmt, rows in TRL_DATA.items():
        with open(path / f"{fmt}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for tok_name, model_name in TRL_MODELS.items():
        tok = transformers.AutoTokenizer.from_pretrained(OUT / "tokenizers" / tok_name)
        model_dir = OUT / "models" / model_name
        for fmt, rows in TRL_DATA.items():
            variants = {"": {"max_length": 1024}, "_maxlen12": {"max_length": 12}}
            if "prompt_completion" in fmt:
                variants["_all_tokens"] = {"max_length": 1024, "completion_only_loss": False}
            for suffix, config in variants.items():
                expected = []
                for i, row in enumerate(rows):
                    entry = trl_process(model_dir, tok, row, **config)
                    expected.append({"row": i, **entry})
                out = {"trl_version": trl.__version__, "sft_config": config, "examples": expected}
                (path / f"expected_{fmt}_{tok_name}{suffix}.json").write_text(json.dumps(out, indent=1))
        rendered = []
        for row in TRL_DATA["messages"]:
            rendered.append({
                "messages": row["messages"],
                "add_generation_prompt_false": tok.apply_chat_template(row["messages"], tokenize=False),
                "add_generation_prompt_true": tok.apply_chat_template(
                    row["messages"], tokenize=False, add_generation_prompt=True),
            })
        (path / f"rendered_{tok_name}.json").write_text(json.dumps(rendered, indent=1, ensure_ascii=False))


def main():
    write_models()
    write_peft()
    write_train_step()
    write_trl()
    (OUT / "VERSIONS.txt").write_text(
        f"torch {torch.__version__}\ntransformers {transformers.__version__}\npeft {peft.__version__}\n"
        f"trl {__import__('trl').__version__}\n"
    )


if __name__ == "__main__":
    main()
