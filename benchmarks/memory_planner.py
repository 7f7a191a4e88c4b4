#!/usr/bin/env python
"""Memory planner: the largest per-GPU batch of a phase that fits a memory budget, found by
measuring peak GPU memory over a few training iterations at growing batch sizes.

    python benchmarks/memory_planner.py --config-file CFG [--phase PRETRAIN] [--budget-gb 11]

Needs a GPU: peak GPU memory cannot be estimated on CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from common import machine, save_json, table
from phase_cost import measure


def _fits(config_file, opts, phase, batch, budget_mb) -> tuple[bool, float]:
    """Train 3 iterations at ``batch`` images in a fresh process; (fits, peak MB)."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            peak = pool.submit(
                measure, config_file, opts, phase, {"IMS_PER_BATCH": batch}, 2, 1
            ).result()["peak_mb"]
        except torch.cuda.OutOfMemoryError:
            return False, float("inf")
    return peak <= budget_mb, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--phase", default="PRETRAIN")
    parser.add_argument("--budget-gb", type=float, default=11.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--json")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "memory_planner: needs a GPU (peak GPU memory is measured, not estimated); "
            "none is available here."
        )
    budget = args.budget_gb * 1024
    tried, batch, good, bad = [], 1, 0, args.max_batch + 1
    while batch < bad and batch <= args.max_batch:  # double, then bisect
        fits, peak = _fits(args.config_file, args.opts, args.phase, batch, budget)
        tried.append([batch, round(peak), "yes" if fits else "no"])
        print(f"batch {batch}: peak {peak:.0f} MB", flush=True)
        good, bad = (batch, bad) if fits else (good, batch)
        batch = batch * 2 if bad > args.max_batch else (good + bad) // 2
        if batch in (good, bad):
            break
    print(f"\n{machine()}\n{args.config_file}, phase {args.phase}, budget {args.budget_gb} GB\n")
    print(table(["images per GPU", "peak MB", "fits"], sorted(tried)))
    print(f"\nlargest batch per GPU that fits: {good}")
    save_json(args.json, {"machine": machine(), "largest_batch": good, "tried": tried})


if __name__ == "__main__":
    main()
