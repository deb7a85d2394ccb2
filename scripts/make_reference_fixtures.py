#!/usr/bin/env python3
"""Writes the reference fixtures under tests/fixtures/ with the real Python stack.

Run from the repo root: `python scripts/make_reference_fixtures.py`. Deterministic (fixed seeds, CPU, f32);
no network (HF_HUB_OFFLINE=1), everything is built locally. Overwrites the outputs listed below; leaves
tests/fixtures/README.md and tests/fixtures/data/ alone. See tests/fixtures/README.md for every file.

Written with (also recorded in tests/fixtures/VERSIONS.txt):
  torch 2.15.0, transformers 5.23.0, peft 0.21.2, trl 1.16.0,
  tokenizers 0.23.3, datasets 5.2.0, accelerate 1.15.0, safetensors 0.8.0 (Python 3.11)
Other versions may write different numbers (or, for TRL, different rules): rerun, then rerun the Rust tests.

Outputs (all small, committed):
  tokenizers/{chatml,llama3}/            byte-level BPE tokenizers (vocab 400) with chat templates
  models/{llama,qwen2,qwen3,smollm3,mistral}/  tiny random models + reference.safetensors
                                         (input_ids int64 [2,16], logits f32 [2,16,V])
  peft/{llama,qwen2}/                    adapter/ (PEFT-written, non-zero B), merged/ (merge_and_unload),
                                         reference.safetensors (input_ids, logits, loss, merged_logits,
                                         grad.<PEFT key> for every LoRA weight)
  train/llama_adamw/                     initial_adapter/, batch.safetensors, steps.json (loss, grad_norm
                                         per step of torch AdamW + clip_grad_norm_), final_adapter/
  trl/<format>.jsonl                     datasets in TRL's four formats
  trl/expected_<format>_<tokenizer>[_<variant>].json
                                         per dataset row, what TRL's SFTTrainer trains on
  trl/rendered_<tokenizer>.json          apply_chat_template(tokenize=False) of each messages row, without and
                                         with add_generation_prompt
  VERSIONS.txt
"""
import json
import os
import platform
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
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import accelerate
import datasets
import peft
import safetensors
import tokenizers
import torch
import transformers
import trl
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

OUT = Path("tests/fixtures")
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()
datasets.disable_caching()
warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------------------------
# 1. Tokenizers
# ---------------------------------------------------------------------------------------------------------------

# Question/answer pairs: the words of the chat/QA examples (tests/fixtures/data, the TRL datasets below).
QA = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is two plus two?", "Four."),
    ("Which planet is known as the red planet?", "Mars."),
    ("What do bees make?", "Honey."),
    ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."),
    ("What gas do plants breathe in?", "Carbon dioxide."),
    ("What is the largest ocean?", "The Pacific."),
    ("Who wrote Hamlet?", "Shakespeare."),
    ("What is the opposite of hot?", "Cold."),
    ("How many hours are in a day?", "Twenty-four."),
    ("What animal says moo?", "A cow."),
    ("What is the boiling point of water in Celsius?", "One hundred degrees."),
    ("What shape has three sides?", "A triangle."),
    ("What is the first letter of the alphabet?", "A."),
    ("Which season comes after winter?", "Spring."),
    ("What do you call a baby dog?", "A puppy."),
    ("What is the tallest animal?", "The giraffe."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Germany?", "Berlin."),
    ("How many minutes are in an hour?", "Sixty."),
    ("What colour is grass?", "Green."),
    ("What is three times three?", "Nine."),
    ("Which animal is known as the king of the jungle?", "The lion."),
    ("What do cows drink?", "Water."),
    ("What is the freezing point of water in Celsius?", "Zero degrees."),
    ("How many continents are there?", "Seven."),
    ("What is the smallest prime number?", "Two."),
]

PROSE = """The quick brown fox jumps over the lazy dog.
You are a helpful AI assistant named SmolLM, trained by Hugging Face.
You are a helpful assistant. Answer the question in one word.
You answer in one word. Be brief. Be kind. Think step by step.
Hello, how are you today? I am fine, thank you. How can I help you?
Can you help me write a poem about the sea? Of course, here is a short poem.
Waves over the sea, the sea sings, the wind sings, the night is long.
The sun rises in the east and sets in the west.
A user asks a question and the assistant gives an answer.
The system message tells the assistant how to behave.
Please summarise the following text in one sentence.
Translate to German: over, under, water, house, dog, cat.
Translate to French: the coffee is good, the bread is fresh.
Question: What is the answer? Answer: The answer is the answer.
Once upon a time there was a little dog who lived in a big house.
The cat sat on the mat and the dog sat on the floor.
Paris is the capital of France, Berlin is the capital of Germany, Tokyo is the capital of Japan.
Bees make honey, cows make milk, plants make oxygen from carbon dioxide and water.
Shakespeare wrote Hamlet, Macbeth and many other plays.
Water boils at one hundred degrees and freezes at zero degrees Celsius.
The Pacific is the largest ocean on the planet, and Mars is the red planet.
A triangle has three sides, a square has four sides, and a circle has none.
Spring comes after winter, summer comes after spring, and autumn comes after summer.
The giraffe is the tallest animal and the blue whale is the largest animal.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 1, 2, 3, 10, 42, 100, 2024.
Punctuation: commas, full stops. Questions? Exclamations! Quotes "like this" and 'this'; colons: and dashes - too.
Code: def add(a, b): return a + b  # adds two numbers
JSON: {"role": "user", "content": "Hello!"}
Café, naïve, über, crème brûlée, São Paulo, Zürich, 東京, 北京, Привет, emoji 🙂 🎉 are all text too.
Trains run on time, rivers run to the sea, and people run in the park.
Good morning! Good evening! Good night! See you tomorrow.
I like apples, bananas, oranges and grapes. She likes tea; he likes coffee.
The teacher asked the students to read the book and write a short story.
It is raining today, so take an umbrella when you go outside.
The answer to the question is in the text above.
Thank you for your help. You are welcome. Have a nice day!
"""


def corpus():
    """A few hundred deterministic lines: the prose above plus every QA pair in several formats."""
    lines = PROSE.splitlines()
    for q, a in QA:
        lines += [
            f"Question: {q}",
            f"Answer: {a}",
            f"{q} {a}",
            f"User: {q} Assistant: {a}",
            f"Q: {q} A: {a} The answer is {a.lower()}",
            f"system: You are a helpful assistant. user: {q} assistant: {a}",
        ]
    return lines * 2


# SmolLM2-135M-Instruct's template (default system message when none is given), plus a realistic guard
# with raise_exception on an unknown role and loop.first / loop.last.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template: bos_token once, then header/eot per message with trimmed content.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TOKENIZER_SPECS = {
    # name: (special tokens in id order, bos, eos, pad, template, post-processor adds BOS)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE, False),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE, True),
}


def make_tokenizer(name):
    specials, bos, eos, pad, template, bos_post_processor = TOKENIZER_SPECS[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos_post_processor:  # as Llama 3's tokenizer.json: ByteLevel, then BOS via TemplateProcessing
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]),
        ])
    else:  # as SmolLM2's: no BOS
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    path = OUT / "tokenizers" / name
    shutil.rmtree(path, ignore_errors=True)
    save_tokenizer(fast, path)
    return fast


def save_tokenizer(tok, path):
    tok.save_pretrained(path)
    # transformers 5 no longer writes special_tokens_map.json; older readers (and the Hub) expect it.
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k) is not None}
    (Path(path) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def check_tokenizers():
    """The saved tokenizers, as every consumer loads them, behave as intended."""
    chatml, llama3 = (transformers.AutoTokenizer.from_pretrained(OUT / "tokenizers" / n) for n in TOKENIZER_SPECS)
    assert len(chatml) == 400 and len(llama3) == 400, (len(chatml), len(llama3))
    assert chatml("Hello")["input_ids"][0] != chatml.bos_token_id, "chatml must not add a BOS"
    assert llama3("Hello")["input_ids"][0] == llama3.bos_token_id, "llama3 must add a BOS"
    assert chatml.pad_token_id == chatml.eos_token_id
    msgs = [{"role": "user", "content": "Hello!"}]
    assert llama3.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"].count(
        llama3.bos_token_id) == 1, "no double BOS from template + post-processor"
    try:
        chatml.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
        raise AssertionError("unknown role must raise")
    except Exception as e:  # transformers wraps raise_exception in TemplateError
        assert "Unknown role: tool" in str(e), e


# ---------------------------------------------------------------------------------------------------------------
# 2. Tiny random models
# ---------------------------------------------------------------------------------------------------------------

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


def build_model(name, **override):
    tok_name, config_cls, model_cls, extra = MODELS[name]
    tok = TOKENIZERS[tok_name]
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **COMMON, **{**extra, **override})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return model, tok


def write_models():
    for name in MODELS:
        model, tok = build_model(name)
        path = OUT / "models" / name
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, safe_serialization=True)
        save_tokenizer(tok, path)
        ids = ids_for(len(tok), 7)
        with torch.no_grad():
            logits = model(ids).logits.float().contiguous()
        save_file({"input_ids": ids, "logits": logits}, path / "reference.safetensors")
        # The saved folder reloads to the same logits.
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, logits), name
        probs = logits.softmax(-1)
        print(f"models/{name}: logits std {logits.std():.2f}, mean max prob {probs.max(-1).values.mean():.2f}")
    check_mistral_window()


def check_mistral_window():
    """transformers applies Mistral's sliding window (eager): without it, positions >= window change."""
    windowed, tok = build_model("mistral")
    full, _ = build_model("mistral", sliding_window=None)
    full.load_state_dict(windowed.state_dict())
    ids = load_file(OUT / "models" / "mistral" / "reference.safetensors")["input_ids"]
    with torch.no_grad():
        a, b = windowed(ids).logits, full(ids).logits
    same_before = torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    differs_after = (a[:, 8:] - b[:, 8:]).abs().amax(-1).min().item() > 1e-4
    print(f"models/mistral: window applied: same for positions < 8: {same_before}, "
          f"different at every position >= 8: {differs_after}")
    assert same_before and differs_after, "transformers did not apply Mistral's sliding window"


# ---------------------------------------------------------------------------------------------------------------
# 3. PEFT
# ---------------------------------------------------------------------------------------------------------------

def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                           task_type="CAUSAL_LM", **kw)


def peft_key(param_name):
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` -> the key PEFT saves."""
    return param_name.replace(".default", "")


def base_model(name):
    return transformers.AutoModelForCausalLM.from_pretrained(OUT / "models" / name, attn_implementation="eager")


def write_peft():
    for name, extra in [("llama", {}), ("qwen2", {"use_rslora": True})]:
        base = base_model(name)
        torch.manual_seed(3)
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
        (path / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model card boilerplate
        ids = ids_for(base.config.vocab_size, 11)
        labels = ids.clone()
        labels[:, :5] = -100
        out = model(ids, labels=labels)
        out.loss.backward()
        tensors = {"input_ids": ids, "logits": out.logits.detach().float().contiguous(),
                   "loss": out.loss.detach().float().reshape(1)}
        for n, p in model.named_parameters():
            if p.requires_grad:
                tensors["grad." + peft_key(n)] = p.grad.detach().contiguous()
        saved = set(load_file(path / "adapter" / "adapter_model.safetensors"))
        grads = {k[len("grad."):] for k in tensors if k.startswith("grad.")}
        assert saved == grads, sorted(saved ^ grads)
        merged = model.merge_and_unload()
        with torch.no_grad():
            tensors["merged_logits"] = merged(ids).logits.float().contiguous()
        err = (tensors["merged_logits"] - tensors["logits"]).abs().max() / tensors["logits"].abs().max()
        assert err < 1e-5, err
        merged.save_pretrained(path / "merged", safe_serialization=True)
        save_file(tensors, path / "reference.safetensors")
        print(f"peft/{name}: loss {out.loss.item():.4f}, {len(grads)} LoRA tensors")


# ---------------------------------------------------------------------------------------------------------------
# 4. Training steps
# ---------------------------------------------------------------------------------------------------------------

def write_train_step():
    path = OUT / "train" / "llama_adamw"
    shutil.rmtree(path, ignore_errors=True)
    base = base_model("llama")
    torch.manual_seed(5)
    model = peft.get_peft_model(base, lora_config())  # PEFT's init: A kaiming-uniform, B = 0
    model.save_pretrained(path / "initial_adapter")
    ids = ids_for(base.config.vocab_size, 13)
    labels = ids.clone()
    labels[:, :5] = -100
    save_file({"input_ids": ids, "labels": labels}, path / "batch.safetensors")
    model.train()  # dropout is 0, so train and eval mode compute the same
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
    (path / "steps.json").write_text(json.dumps(steps, indent=1) + "\n")
    model.save_pretrained(path / "final_adapter")
    for sub in ("initial_adapter", "final_adapter"):
        (path / sub / "README.md").unlink(missing_ok=True)
    print(f"train/llama_adamw: {steps}")


# ---------------------------------------------------------------------------------------------------------------
# 5. TRL
# ---------------------------------------------------------------------------------------------------------------

TRL_DATA = {
    "text": [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "Café, naïve, über: text is text. 東京 🙂"},
        {"text": "Hello, how are you today? I am fine, thank you."},
        # Ends with chatml's EOS string: TRL appends EOS only when the text does not already end with it.
        {"text": "Question: What do bees make?\nAnswer: Honey.<|im_end|>"},
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
        # Surrounding whitespace: kept by the ChatML template, trimmed by Llama 3's `| trim`.
        {"messages": [{"role": "system", "content": "  Be brief.\n"},
                      {"role": "user", "content": "What is frozen water called?  "},
                      {"role": "assistant", "content": "\nIce. "}]},
    ],
    "prompt_completion": [
        {"prompt": "Question: What is two plus two?\nAnswer:", "completion": " Four."},
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Translate to German: over", "completion": " über"},
        # Prompt ends with a space that merges into the completion's first token: the tokenized prompt is
        # not a prefix of the tokenized prompt+completion (TRL's common_prefix_length case).
        {"prompt": "The opposite of hot is ", "completion": "cold."},
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
        {"prompt": [{"role": "user", "content": "Translate to French: the coffee is good."}],
         "completion": [{"role": "assistant", "content": "Le café est bon. ☕"}]},
    ],
}

TRL_MODELS = {"chatml": "qwen2", "llama3": "llama"}

# The SFTConfig fields that decide tokenization, recorded with their effective values in every expected file.
TRL_CONFIG_FIELDS = ["max_length", "truncation_mode", "completion_only_loss", "assistant_only_loss", "packing",
                     "padding_free", "dataset_text_field", "eos_token", "pad_token", "chat_template_path",
                     "shuffle_dataset"]


def trl_variants(fmt):
    variants = {"": {"max_length": 1024}, "_maxlen12": {"max_length": 12}}
    if fmt in ("prompt_completion", "conversational_prompt_completion"):
        variants["_all_tokens"] = {"max_length": 1024, "completion_only_loss": False}
    if fmt == "conversational_prompt_completion":
        # 12 tokens drop every row (the prompts alone are longer); 48 keeps some rows whole, cuts some
        # completions and drops the rest.
        variants["_maxlen48"] = {"max_length": 48}
    return variants


def trl_process(model_dir, tok, row, **config):
    """What TRL's SFTTrainer trains on for one row: the processed example and the collator's labels."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], bf16=False, use_cpu=True, seed=0, **config)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tok)
        effective = {f: getattr(args, f) for f in TRL_CONFIG_FIELDS}
        effective["completion_only_loss"] = trainer.completion_only_loss  # None resolves per dataset
        effective["eos_token"] = trainer._tokenizer.eos_token
        effective["pad_token"] = trainer._tokenizer.pad_token
        effective["dataset_columns"] = trainer.train_dataset.column_names
        if len(trainer.train_dataset) == 0:
            return effective, {"dropped": True, "input_ids": None, "completion_mask": None,
                               "assistant_masks": None, "labels": None}
        example = trainer.train_dataset[0]
        batch = trainer.data_collator([example])
        labels = batch["labels"][0].tolist()
        assert batch["input_ids"][0].tolist() == example["input_ids"]
        assert labels == example["labels"], "collator labels differ from the dataset's labels column"
        return effective, {
            "dropped": False,
            "input_ids": example["input_ids"],
            "completion_mask": example.get("completion_mask"),
            "assistant_masks": example.get("assistant_masks"),
            "labels": labels,
        }


def write_trl():
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
            for suffix, config in trl_variants(fmt).items():
                expected, effective = [], None
                for i, row in enumerate(rows):
                    effective, entry = trl_process(model_dir, tok, row, **config)
                    expected.append({"row": i, **entry})
                out = {
                    "trl_version": trl.__version__,
                    "tokenizer": tok_name,
                    "model": f"models/{model_name}",
                    "sft_config": config,  # the fields passed to SFTConfig (TRL's defaults otherwise)
                    "config": effective,   # effective values of the fields that decide tokenization
                    "examples": expected,
                }
                name = f"expected_{fmt}_{tok_name}{suffix}.json"
                (path / name).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
                kept = sum(not e["dropped"] for e in expected)
                print(f"trl/{name}: {kept}/{len(expected)} rows kept")
        rendered = []
        for row in TRL_DATA["messages"]:
            rendered.append({
                "messages": row["messages"],
                "add_generation_prompt_false": tok.apply_chat_template(
                    row["messages"], tokenize=False, add_generation_prompt=False),
                "add_generation_prompt_true": tok.apply_chat_template(
                    row["messages"], tokenize=False, add_generation_prompt=True),
            })
        (path / f"rendered_{tok_name}.json").write_text(json.dumps(rendered, indent=1, ensure_ascii=False) + "\n")


def write_versions():
    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "trl": trl.__version__, "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__, "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }
    (OUT / "VERSIONS.txt").write_text("".join(f"{k} {v}\n" for k, v in versions.items()))


def main():
    global TOKENIZERS
    OUT.mkdir(parents=True, exist_ok=True)
    TOKENIZERS = {name: make_tokenizer(name) for name in TOKENIZER_SPECS}
    check_tokenizers()
    write_models()
    write_peft()
    write_train_step()
    write_trl()
    write_versions()


if __name__ == "__main__":
    main()
