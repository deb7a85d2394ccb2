#!/usr/bin/env python3
"""Writes tests/fixtures/trl/expected_tools*_toolchat*.json: what TRL's SFTTrainer trains on for tool-calling rows.

Run from the repo root: `python scripts/make_trl_tools_fixtures.py` (after make_reference_fixtures.py, whose
`trl_process` and tiny models it uses). Datasets: trl/tools.jsonl (messages with a `tools` column given as a
list or as a JSON string, assistant `tool_calls` with arguments as an object or a JSON string, `tool` turns,
and `chat_template_kwargs`) and trl/tools_prompt_completion.jsonl (conversational prompt-completion with
tools). Tokenizer: tokenizers/toolchat (the chatml fixture tokenizer with a tool-calling template written
for these fixtures, with {% generation %} blocks). Variants: TRL's defaults (max_length 1024), and
assistant_only_loss=True. Written with trl 1.16.0, transformers 5.24.0 (Python 3.11).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_reference_fixtures as ref  # re-executes with PYTHONHASHSEED=0, as that script does
import transformers
import trl

VARIANTS = {"": {"max_length": 1024}, "_assistant_only": {"max_length": 1024, "assistant_only_loss": True}}


def main():
    path = ref.OUT / "trl"
    tok = transformers.AutoTokenizer.from_pretrained(ref.OUT / "tokenizers" / "toolchat")
    model_dir = ref.OUT / "models" / ref.TRL_MODELS["chatml"]
    for fmt in ["tools", "tools_prompt_completion"]:
        rows = [json.loads(line) for line in (path / f"{fmt}.jsonl").read_text().splitlines()]
        for suffix, config in VARIANTS.items():
            expected, effective = [], None
            for i, row in enumerate(rows):
                effective, entry = ref.trl_process(model_dir, tok, row, **config)
                expected.append({"row": i, **entry})
            out = {"trl_version": trl.__version__, "tokenizer": "toolchat",
                   "model": f"models/{ref.TRL_MODELS['chatml']}", "sft_config": config, "config": effective,
                   "examples": expected}
            name = f"expected_{fmt}_toolchat{suffix}.json"
            (path / name).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
            print(f"trl/{name}: {sum(not e['dropped'] for e in expected)}/{len(expected)} rows kept")
    rendered = []
    for line in (path / "tools.jsonl").read_text().splitlines():
        row = json.loads(line)
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
        kwargs = row.get("chat_template_kwargs", {})
        rendered.append({"row": row, "text": tok.apply_chat_template(
            row["messages"], tools=tools, tokenize=False, add_generation_prompt=False, **kwargs)})
    (path / "rendered_tools_toolchat.json").write_text(json.dumps(rendered, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
