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
from pathlib import Path

from common import collect_run, machine, mean_std, run_training, save_json, table

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
    run_training(METHODS[method], folder, ["SEED", str(seed), *EVALS])
    return folder


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

    results = {m: [collect_run(run(m, s, args.out)) for s in args.seeds] for m in args.methods}
    rows = [
        [
            m,
            len(r),
            mean_std([x["AP"] for x in r]),
            mean_std([x["AP50"] for x in r]),
            mean_std([x["train_seconds"] / 60 for x in r]),
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
