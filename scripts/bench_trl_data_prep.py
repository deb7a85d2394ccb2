#!/usr/bin/env python3
"""Times TRL's SFTTrainer dataset preparation (tokenization with the chat template, masks) on a
JSON Lines file, for the side-by-side with `peft-sft data inspect` in benches/README.md.

  python scripts/bench_trl_data_prep.py DATASET.jsonl [--num-proc N]
  python scripts/bench_trl_data_prep.py --make-synthetic OUT.jsonl [--rows 20000]
"""
import argparse
import json
import os
import random
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def make_synthetic(path, rows):
    random.seed(0)
    words = "the quick brown fox jumps over lazy dog model train data loss token chat answer question".split()
    with open(path, "w") as f:
        for _ in range(rows):
            q = " ".join(random.choice(words) for _ in range(random.randint(5, 30)))
            a = " ".join(random.choice(words) for _ in range(random.randint(10, 60)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


def bench(path, num_proc):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    model_dir = "tests/fixtures/models/qwen2"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = datasets.load_dataset("json", data_files=path, split="train")
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=SFTConfig(
        output_dir="/tmp/trl-data-prep", max_length=1024, report_to=[], dataset_num_proc=num_proc,
        use_cpu=True, bf16=False))
    seconds = time.perf_counter() - start
    print(json.dumps({"impl": "trl", "rows": len(ds), "kept": len(trainer.train_dataset),
                      "seconds": seconds, "rows_per_second": len(ds) / seconds, "num_proc": num_proc}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", nargs="?")
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--make-synthetic", metavar="OUT")
    p.add_argument("--rows", type=int, default=20000)
    args = p.parse_args()
    if args.make_synthetic:
        make_synthetic(args.make_synthetic, args.rows)
    else:
        bench(args.dataset, args.num_proc)


if __name__ == "__main__":
    main()
