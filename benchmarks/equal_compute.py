#!/usr/bin/env python
"""Equal-compute study on the embedded dataset: scratch at high resolution vs direct
pre-training + fine-tuning vs AlignDet, each sized to about the same training time, several
seeds. Prints a table of box AP / AP50 (mean +- std) and writes a plot of AP against training
time. Finished runs are kept: rerunning the command continues the study.

    python benchmarks/equal_compute.py [--seeds 0 1 2] [--methods scratch direct aligndet]
        [--out output/bench/equal_compute]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from direct_pretrain.report import ap_vs_time

from common import machine, save_json, table

# method -> its config; the configs' phase lengths give each about 10 minutes on 2 CPU cores.
METHODS = {
    "scratch": "configs/trees/faster_rcnn_R_18_FPN_scratch.yaml",
    "direct": "configs/trees/faster_rcnn_R_18_FPN_direct.yaml",
    "aligndet": "configs/trees/faster_rcnn_R_18_FPN_aligndet.yaml",
}
# Intermediate evaluations for the AP-vs-time curves (their time is not training time).
EVALS = [
    "DIRECT_PRETRAIN.PRETRAIN.EVAL_PERIOD",
    "100",
    "DIRECT_PRETRAIN.FINETUNE.EVAL_PERIOD",
    "25",
]
COLORS = {"scratch": "tab:gray", "direct": "tab:blue", "aligndet": "tab:orange"}


def run(method: str, seed: int, out: Path) -> Path:
    """Train one method with one seed (skipped if finished); return its output folder."""
    folder = out / method / f"seed{seed}"
    if (folder / "summary.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "train_net.py",
        "--config-file",
        METHODS[method],
        "OUTPUT_DIR",
        str(folder),
        "SEED",
        str(seed),
        *EVALS,
    ]
    print(f"{method} seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(folder / "stdout.log", "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"  done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return folder


def collect(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    records = {
        p: json.loads((folder / p.lower() / "phase_done.json").read_text())
        for p in summary["phases"]
    }
    last = list(summary["phases"].values())[-1]
    train = sum(r["wall_seconds"] - r["eval_seconds"] for r in records.values())
    return {
        "AP": last["AP"],
        "AP50": last["AP50"],
        "train_seconds": train,
        "curves": ap_vs_time(records),
    }


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {spread:.1f}"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in results.items():
        for i, r in enumerate(runs):
            for phase, points in r["curves"].items():
                low_res = phase == "PRETRAIN"
                xs, ys = zip(*[(t / 60, ap) for t, ap in points])
                ax.plot(
                    xs,
                    ys,
                    color=COLORS.get(method),
                    alpha=0.35 if low_res else 0.8,
                    linestyle="--" if low_res else "-",
                    marker="o",
                    markersize=3,
                    label=method if i == 0 and not low_res else None,
                )
    ax.set_xlabel("training time on 2 CPU cores (minutes)")
    ax.set_ylabel("box AP on neon_trees_val")
    ax.set_title("Equal compute: AP during training (dashed: pre-training at 128 px)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("output/bench/equal_compute"))
    args = parser.parse_args()

    results = {m: [collect(run(m, s, args.out)) for s in args.seeds] for m in args.methods}
    rows = [
        [
            m,
            len(r),
            _mean_std([x["AP"] for x in r]),
            _mean_std([x["AP50"] for x in r]),
            _mean_std([x["train_seconds"] / 60 for x in r]),
        ]
        for m, r in results.items()
    ]
    print(f"\n{machine()}\n")
    print(table(["method", "seeds", "box AP", "AP50", "training minutes"], rows))
    plot(results, args.out / "ap_vs_time.png")
    save_json(
        str(args.out / "results.json"),
        {"machine": machine(), "seeds": args.seeds, "results": results},
    )
    print(f"\nplot: {args.out / 'ap_vs_time.png'}")


if __name__ == "__main__":
    main()
