#!/usr/bin/env python3
"""Reads a peft-sft run's TensorBoard event files with TensorBoard's own EventAccumulator and
prints each scalar tag with its point count, first/last step and last value.

Usage: python3 scripts/check_tensorboard.py RUN_DIR   (RUN_DIR: OUTPUT or OUTPUT/runs)

Needs `pip install tensorboard`. Exits 1 when no event file is found or none holds a scalar
TensorBoard can read (a damaged record is dropped by TensorBoard, as it checks the CRCs).
"""

import glob
import os
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    run_dir = sys.argv[1]
    if os.path.isdir(os.path.join(run_dir, "runs")):
        run_dir = os.path.join(run_dir, "runs")
    files = sorted(glob.glob(os.path.join(run_dir, "*tfevents*")))
    if not files:
        print(f"{run_dir}: no *tfevents* file (was the run trained with --report-to none or jsonl?)",
              file=sys.stderr)
        return 1
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        print("tensorboard is not installed: pip install tensorboard", file=sys.stderr)
        return 1

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    print(f"{run_dir}: {len(files)} event file(s), {len(tags)} scalar tag(s)")
    for name in files:
        print(f"  {os.path.basename(name)} ({os.path.getsize(name)} bytes)")
    if not tags:
        print(f"{run_dir}: TensorBoard read no scalar from the event files", file=sys.stderr)
        return 1
    width = max(len(tag) for tag in tags)
    for tag in sorted(tags):
        points = accumulator.Scalars(tag)
        print(f"  {tag:<{width}}  {len(points):5d} points  steps {points[0].step}..{points[-1].step}"
              f"  last {points[-1].value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
