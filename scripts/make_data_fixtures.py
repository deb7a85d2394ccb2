#!/usr/bin/env python3
"""Writes the parquet and CSV copies of the JSON Lines data fixtures (tests/fixtures/data/), the way
Hugging Face `datasets` stores them: parquet with pyarrow (snappy), CSV with a header row.

  python scripts/make_data_fixtures.py      # needs pyarrow (pip install pyarrow)
"""
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data"


def rows(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def main():
    pq.write_table(pa.Table.from_pylist(rows("qa_chat.jsonl")), DATA / "qa_chat.parquet", compression="snappy")
    pc = rows("qa_prompt_completion.jsonl")
    with open(DATA / "qa_prompt_completion.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(pc[0].keys()))
        writer.writeheader()
        writer.writerows(pc)
    print("wrote qa_chat.parquet and qa_prompt_completion.csv")


if __name__ == "__main__":
    main()
