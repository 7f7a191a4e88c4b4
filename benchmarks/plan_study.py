#!/usr/bin/env python
"""Plan study: the planned run (``configs/planned/faster_rcnn_R_18_FPN.yaml``, a model and a
budget) against the hand-tuned demo config at equal training time, on the embedded tree-crown
tiles (256 px, what the demo was tuned on) and on the same orthophotos cut into 512-px tiles
(objects at the same pixel size, images 4x larger: the demo config unchanged shrinks them).

For each dataset and seed the demo config runs first; the planned run then gets its training
CPU time (one thread, evaluation apart) as ``DIRECT_PRETRAIN.BUDGET_MINUTES``: on a machine
shared with other jobs wall time measures the neighbours, CPU time the run's own compute. Runs go ``--jobs`` at a
time, each pinned to one thread (a 2-core machine runs two). Finished runs are kept and an
interrupted one resumes: rerunning the command continues the study; ``--report-only`` writes
the table and figure from the runs finished so far.

    python benchmarks/plan_study.py [--out output/bench/plan_study] [--seeds 0 1]
        [--datasets trees256 trees512] [--jobs 2] [--figure PNG] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from direct_pretrain.config import get_cfg  # noqa: E402
from direct_pretrain.data.datasets import cache_dir  # noqa: E402
from direct_pretrain.data.trees import build_neon_trees  # noqa: E402

from common import DEMO_CONFIG, collect_run, machine, run_training, table  # noqa: E402

PLANNED_CONFIG = "configs/planned/faster_rcnn_R_18_FPN.yaml"
METHODS = ("demo", "planned")
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def dataset_opts(dataset: str) -> list[str]:
    """Overrides that train and evaluate on ``dataset`` ("trees256" is the configs' own)."""
    if dataset == "trees256":
        return []
    tile = int(dataset.removeprefix("trees"))
    built = build_neon_trees(cache_dir(get_cfg().DIRECT_PRETRAIN), tile=tile)
    register = [[f"{dataset}_{split}", *built[split]] for split in ("train", "val")]
    return [
        "DIRECT_PRETRAIN.REGISTER_COCO",
        repr(register),
        "DATASETS.TRAIN",
        f"('{dataset}_train',)",
        "DATASETS.TEST",
        f"('{dataset}_val',)",
    ]


def folder(out: Path, dataset: str, method: str, seed: int) -> Path:
    return out / dataset / f"{method}_seed{seed}"


def train_pair(out: Path, dataset: str, seed: int) -> None:
    """The demo config, then the planned config at the demo run's training minutes."""
    # The demo config trains on the whole training set (no validation slice: its final model
    # is its last phase's); the planned run holds out its default slice (10%) to measure the
    # fine-tune scale and choose the final model on, and trains on the rest.
    opts = [*dataset_opts(dataset), "SEED", str(seed)]
    demo = folder(out, dataset, "demo", seed)
    run_training(DEMO_CONFIG, demo, [*opts, "DIRECT_PRETRAIN.VAL_SLICE", "0"], SINGLE_THREAD)
    minutes = round(collect_run(demo, clock="cpu")["train_cpu_seconds"] / 60, 2)
    budget = ["DIRECT_PRETRAIN.BUDGET_MINUTES", str(minutes)]
    run_training(
        PLANNED_CONFIG, folder(out, dataset, "planned", seed), opts + budget, SINGLE_THREAD
    )


def run_all(out: Path, datasets: list[str], seeds: list[int], jobs: int) -> None:
    """Every (dataset, seed) pair, ``jobs`` at a time; a failed pair is reported, not fatal."""
    pending = [(d, s) for s in seeds for d in datasets]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                dataset, seed = pending.pop(0)
            try:
                train_pair(out, dataset, seed)
            except Exception:  # noqa: BLE001 - one failed run leaves the others going
                traceback.print_exc()

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def plan_of(run: Path) -> dict:
    """The planned keys that matter most, from the run's plan.yaml."""
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    values = plan["values"]
    for replanned in plan.get("replanned", {}).values():
        values.update(replanned["values"])

    def size(phase: str) -> str:
        node = f"DIRECT_PRETRAIN.{phase}."
        if values.get(node + "AUGMENTATION") == "fixed_size_crop":
            return f"{values[node + 'SCALE'][0]} crop {values[node + 'CROP_SIZE'][0]}"
        return str(values.get(node + "MIN_SIZE_TRAIN", ["yours"])[0])

    measured = plan.get("replanned", {}).get("FINETUNE", {}).get("measured")
    return {
        "sizes": f"{size('PRETRAIN')} / {size('FINETUNE')}",
        "measured": measured["figure"].split("slice ")[-1] if measured else "-",
        "anchors": values.get("MODEL.ANCHOR_GENERATOR.SIZES", "yours"),
        "epochs": f"{values.get('DIRECT_PRETRAIN.PRETRAIN.EPOCHS')} + "
        f"{values.get('DIRECT_PRETRAIN.FINETUNE.EPOCHS')}",
    }


def collect(out: Path, datasets: list[str], seeds: list[int]) -> dict:
    results = {}
    for dataset in datasets:
        for method in METHODS:
            for seed in seeds:
                run = folder(out, dataset, method, seed)
                if not (run / "summary.json").is_file():
                    continue
                result = collect_run(run, clock="cpu")
                summary = json.loads((run / "summary.json").read_text())
                result["phases"] = {p: v["AP"] for p, v in summary["phases"].items()}
                result["final"] = summary.get("final_phase") or list(summary["phases"])[-1]
                if method == "planned":
                    result["plan"] = plan_of(run)
                results[(dataset, method, seed)] = result
    return results


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    spread = (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.1f} ± {spread:.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def report(results: dict, datasets: list[str], figure: str | None) -> str:
    rows = []
    for dataset in datasets:
        for method in METHODS:
            runs = [r for (d, m, _), r in sorted(results.items()) if d == dataset and m == method]
            if not runs:
                continue
            rows.append(
                [
                    dataset,
                    method,
                    len(runs),
                    _mean_spread([r["AP"] for r in runs]),
                    _mean_spread([r["AP50"] for r in runs]),
                    _mean_spread([r["train_cpu_seconds"] / 60 for r in runs]),
                    _mean_spread([r["train_seconds"] / 60 for r in runs]),
                    " / ".join(
                        "; ".join(f"{p} {ap:.1f}" for p, ap in r["phases"].items())
                        + f" (final {r['final']})"
                        for r in runs
                    ),
                    " / ".join(json.dumps(r["plan"]) for r in runs if "plan" in r),
                ]
            )
    headers = [
        "data",
        "method",
        "seeds",
        "box AP",
        "AP50",
        "training CPU min",
        "training wall min",
        "phases per seed (final model)",
        "plan",
    ]
    if figure:
        _plot(results, datasets, figure)
    return f"{machine(threads=1)}\n\n{table(headers, rows)}"


def _plot(results: dict, datasets: list[str], path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, dataset in enumerate(datasets):
        for j, method in enumerate(METHODS):
            aps = [r["AP"] for (d, m, _), r in results.items() if d == dataset and m == method]
            if aps:
                x = i + (j - 0.5) * 0.35
                ax.bar(
                    x, statistics.mean(aps), 0.3, color=f"C{j}", label=method if i == 0 else None
                )
                ax.plot([x] * len(aps), aps, "k.", ms=8)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("box AP (final model; dots: seeds)")
    ax.set_title("Planned vs hand-tuned demo config at equal training time")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/bench/plan_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--datasets", nargs="+", default=["trees256", "trees512"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report_only:
        run_all(out, args.datasets, args.seeds, args.jobs)
    print(report(collect(out, args.datasets, args.seeds), args.datasets, args.figure))


if __name__ == "__main__":
    main()
