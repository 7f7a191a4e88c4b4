#!/usr/bin/env python
"""Budget study on the embedded dataset: scratch at high resolution vs direct pre-training +
fine-tuning, each at 1x, 2x and 4x its config's schedule (every phase's EPOCHS and STEP_EPOCHS
scaled, so LR drops keep their relative place). Training time is the CPU time of the training
process, pinned to one thread with in-process data loading, evaluation excluded: a measure that
other load on a shared machine does not change. Writes a table of final box AP per method and
budget, the time direct needs to reach each scratch budget's final AP, where the two cross,
and a plot of AP against training time. Finished runs are kept and an interrupted one resumes:
rerunning the command continues the study; --report-only builds the report from the runs
finished so far. Each run uses one core: on a machine with two, one command per method
(--methods scratch, --methods direct) runs the study in half the time.

    python benchmarks/budget_study.py [--out output/bench/budget_study]
        [--methods scratch direct] [--figure PNG] [--report-only]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import traceback
from pathlib import Path

import numpy as np

from direct_pretrain.config_systems import load_config
from direct_pretrain.phases import active_phases

from common import collect_run, machine, phase_cfg, run_training, save_json, table

METHODS = {
    "scratch": "configs/trees/faster_rcnn_R_18_FPN_scratch.yaml",
    "direct": "configs/trees/faster_rcnn_R_18_FPN_direct.yaml",
}
BUDGETS = (1, 2, 4)
# (budget, seed) in the order they run, each for both methods: seed 0 at every budget first
# (where, if anywhere, scratch catches up), then the second seeds for the spread.
PLAN = ((1, 0), (2, 0), (4, 0), (1, 1), (2, 1))
EVALS_PER_PHASE = 10  # evaluations along each phase for the curves (their time is not counted)
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
RESUMED = re.compile(r"Starting training from iteration [1-9]")  # Detectron2's train loop
CMAPS = {"scratch": "Oranges", "direct": "Blues"}
FINAL_PHASE = "FINETUNE"  # both methods end with it; its evaluations use the 256 px test size

Key = tuple[str, int, int]  # (method, budget, seed)
Curve = list[tuple[float, float]]  # (training seconds, box AP)


def scaled_opts(config: str, budget: float) -> list[str]:
    """Overrides that scale every active phase of ``config`` by ``budget`` (EPOCHS and
    STEP_EPOCHS) and evaluate about EVALS_PER_PHASE times along each phase."""
    cfg = load_config(config, [])
    opts = []
    for phase in active_phases(cfg):
        node = cfg.DIRECT_PRETRAIN[phase]
        changes = {
            "EPOCHS": node.EPOCHS * budget,
            "STEP_EPOCHS": tuple(s * budget for s in node.STEP_EPOCHS),
        }
        max_iter = phase_cfg(config, [], phase, changes).SOLVER.MAX_ITER
        changes["EVAL_PERIOD"] = max(1, round(max_iter / EVALS_PER_PHASE))
        for key, value in changes.items():
            opts += [f"DIRECT_PRETRAIN.{phase}.{key}", str(value)]
    return opts


def run_folder(out: Path, method: str, budget: int, seed: int) -> Path:
    return out / method / f"{budget}x" / f"seed{seed}"


def planned() -> list[Key]:
    """Every run of the study, in the order it runs."""
    return [(method, budget, seed) for budget, seed in PLAN for method in METHODS]


def train(out: Path, method: str, budget: int, seed: int) -> None:
    """Train one run on one thread (skipped if finished, resumed if interrupted)."""
    if (run_folder(out, method, budget, seed) / "summary.json").is_file():
        return
    opts = ["SEED", str(seed), "DATALOADER.NUM_WORKERS", "0", *scaled_opts(METHODS[method], budget)]
    run_training(METHODS[method], run_folder(out, method, budget, seed), opts, SINGLE_THREAD)


def collect_all(out: Path) -> dict[Key, dict | None]:
    """Every planned run's result (None while it has not finished); "resumed" says whether
    a phase was interrupted and resumed: its evaluations before the resume are missing from
    its curve, and its training time counts the evaluation time before the resume."""
    results = {}
    for key in planned():
        folder = run_folder(out, *key)
        if not (folder / "summary.json").is_file():
            results[key] = None
            continue
        log = folder / "stdout.log"
        resumed = log.is_file() and bool(RESUMED.search(log.read_text(errors="replace")))
        results[key] = {**collect_run(folder, clock="cpu"), "resumed": resumed}
    return results


def time_to_ap(curve: Curve, target: float) -> float | None:
    """Earliest time at which ``curve`` reaches ``target`` AP, interpolated linearly between
    evaluations (the first evaluation's time if that one is already above); None if never."""
    previous = None
    for t, ap in curve:
        if ap >= target:
            if previous is None:
                return t
            t0, ap0 = previous
            return t0 + (t - t0) * (target - ap0) / (ap - ap0)
        previous = (t, ap)
    return None


def _diff(a: Curve, b: Curve, t: float) -> float:
    """Curve ``a`` minus curve ``b`` at time ``t`` (both interpolated linearly)."""
    return float(np.interp(t, *zip(*a)) - np.interp(t, *zip(*b)))


def crossings(a: Curve, b: Curve) -> list[float]:
    """Times at which curve ``a`` minus curve ``b`` changes sign, on their common time range
    (both interpolated linearly)."""
    if not a or not b:
        return []
    start, end = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    ts = sorted({t for t, _ in a + b if start <= t <= end})
    diff = [_diff(a, b, t) for t in ts]
    found = []
    for t0, t1, d0, d1 in zip(ts, ts[1:], diff, diff[1:]):
        if d0 * d1 < 0:
            found.append(t0 + (t1 - t0) * d0 / (d0 - d1))
        elif d1 == 0 and d0 != 0:
            found.append(t1)
    return found


def _mean_spread(values: list[float]) -> str:
    """Mean, with +- half the range when there are several values."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} +- {(max(values) - min(values)) / 2:.1f}"


def finals(results: dict[Key, dict | None]) -> dict[tuple[str, int], dict]:
    """Per (method, budget) with a finished run: mean final AP and training CPU seconds,
    and the finished runs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for (method, budget, _), r in results.items():
        if r is not None:
            groups.setdefault((method, budget), []).append(r)
    return {
        key: {
            "AP": statistics.mean(r["AP"] for r in runs),
            "cpu_seconds": statistics.mean(r["train_cpu_seconds"] for r in runs),
            "runs": runs,
        }
        for key, runs in groups.items()
    }


def final_rows(results: dict[Key, dict | None]) -> list[list]:
    """Table rows: method, budget, seeds finished / planned, box AP, AP50, CPU and wall
    training minutes (mean +- half range over seeds; "pending" if none finished)."""
    rows = []
    for method in METHODS:
        for budget in BUDGETS:
            keys = [k for k in results if k[:2] == (method, budget)]
            runs = [results[k] for k in keys if results[k] is not None]
            done = f"{len(runs)}/{len(keys)}"
            if any(r["resumed"] for r in runs):
                done += " (resumed)"
            if not runs:
                rows.append([method, f"{budget}x", done, "pending", "-", "-", "-"])
                continue
            rows.append(
                [
                    method,
                    f"{budget}x",
                    done,
                    _mean_spread([r["AP"] for r in runs]),
                    _mean_spread([r["AP50"] for r in runs]),
                    _mean_spread([r["train_cpu_seconds"] / 60 for r in runs]),
                    _mean_spread([r["train_seconds"] / 60 for r in runs]),
                ]
            )
    return rows


def time_to_ap_rows(results: dict[Key, dict | None]) -> list[list]:
    """Per finished scratch budget: its mean final AP and CPU minutes, then per direct
    budget the CPU minutes its fine-tune curve needs to reach that AP (mean over its seeds;
    "<=" when its first fine-tune evaluation is already above) and their ratio to scratch's
    minutes; the last column is the smallest ratio over direct budgets."""
    done = finals(results)
    rows = []
    for budget in BUDGETS:
        scratch = done.get(("scratch", budget))
        if scratch is None:
            continue
        target, base = scratch["AP"], scratch["cpu_seconds"]
        row, best = [f"{budget}x", f"{target:.1f}", f"{base / 60:.1f}"], None
        for direct_budget in BUDGETS:
            direct = done.get(("direct", direct_budget))
            if direct is None:
                row.append("pending")
                continue
            curves = [r["curves"].get(FINAL_PHASE, []) for r in direct["runs"]]
            times = [time_to_ap(c, target) for c in curves]
            if any(t is None for t in times):
                reached = sum(t is not None for t in times)
                row.append(f"not reached ({reached}/{len(times)} seeds)")
                continue
            upper = any(t == c[0][0] for t, c in zip(times, curves))
            seconds = statistics.mean(times)
            best = min(best, seconds / base) if best is not None else seconds / base
            row.append(f"{'<=' if upper else ''}{seconds / 60:.1f} ({seconds / base:.2f}x)")
        rows.append([*row, f"{best:.2f}x" if best is not None else "-"])
    return rows


def compare(scratch: Curve, direct: Curve) -> str:
    """Which is ahead where the two curves overlap, and where they cross (CPU minutes)."""
    start, end = max(scratch[0][0], direct[0][0]), min(scratch[-1][0], direct[-1][0])
    if start > end:
        return "no common time range"
    found = crossings(scratch, direct)

    def ahead(t: float) -> str:
        d = _diff(scratch, direct, t)
        leader = "scratch" if d > 0 else "direct" if d < 0 else "neither"
        return f"{leader} ahead by {abs(d):.1f} AP"

    text = f"from {start / 60:.1f} to {end / 60:.1f} CPU min: {ahead(start)} at the start"
    if found:
        text += ", cross at " + ", ".join(f"{t / 60:.1f}" for t in found) + f"; {ahead(end)}"
        return text + " at the end"
    return text + f", {ahead(end)} at the end, no crossing"


def crossing_notes(results: dict[Key, dict | None]) -> list[str]:
    """Where scratch and direct cross: their final-AP-against-time lines (one point per
    budget, mean over seeds), and each budget's two fine-tune curves of the same seed."""
    done = finals(results)
    lines = {
        m: sorted((v["cpu_seconds"], v["AP"]) for (method, _), v in done.items() if method == m)
        for m in METHODS
    }
    notes = []
    scratch, direct = lines["scratch"], lines["direct"]
    if len(scratch) > 1 and len(direct) > 1:
        notes.append(
            f"final AP against time, one point per budget ({len(scratch)} scratch, "
            f"{len(direct)} direct): {compare(scratch, direct)}"
        )
    for (method, budget, seed), r in results.items():
        other = results.get(("direct", budget, seed))
        if method != "scratch" or r is None or other is None:
            continue
        scratch, direct = r["curves"].get(FINAL_PHASE), other["curves"].get(FINAL_PHASE)
        if scratch and direct:
            notes.append(f"{budget}x seed {seed}, fine-tune curves: {compare(scratch, direct)}")
    return notes


def plot(results: dict[Key, dict | None], path: Path) -> None:
    """Every run's AP-vs-CPU-time curve and each budget's final point (mean, +- half range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def color(method: str, budget: int):
        return plt.get_cmap(CMAPS[method])(0.45 + 0.5 * BUDGETS.index(budget) / (len(BUDGETS) - 1))

    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, budget, seed), r in results.items():
        if r is None:
            continue
        for phase, points in r["curves"].items():
            low_res = phase != FINAL_PHASE
            xs, ys = zip(*[(t / 60, ap) for t, ap in points])
            ax.plot(
                xs,
                ys,
                color=color(method, budget),
                alpha=0.3 if low_res else 0.7,
                linestyle="--" if low_res else "-" if seed == 0 else ":",
                linewidth=1,
            )
    for method in METHODS:
        points = sorted(
            (v["cpu_seconds"] / 60, v["AP"], b, [r["AP"] for r in v["runs"]])
            for (m, b), v in finals(results).items()
            if m == method
        )
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color(method, 4), lw=2)
        for x, y, budget, aps in points:
            ax.errorbar(
                x,
                y,
                yerr=(max(aps) - min(aps)) / 2,
                color=color(method, budget),
                marker="o",
                markersize=8,
                capsize=3,
                label=f"{method} {budget}x ({len(aps)} seed{'s' if len(aps) > 1 else ''})",
            )
    ax.set_xlabel("training CPU minutes (one thread, evaluation excluded)")
    ax.set_ylabel("box AP on neon_trees_val")
    ax.set_title(
        "Budget study: curves (seed 1 dotted; dashed: pre-training at 128 px),\n"
        "final points (mean, bars: half range) joined per method",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(out: Path, figure: Path) -> str:
    """Build the tables, notes, plot and results.json from the runs finished so far."""
    results = collect_all(out)
    threads = int(SINGLE_THREAD["OMP_NUM_THREADS"])
    text = "\n\n".join(
        [
            f"{machine(threads)} (training processes: "
            + ", ".join(f"{k}={v}" for k, v in SINGLE_THREAD.items())
            + ", DATALOADER.NUM_WORKERS 0)",
            "Final box AP per method and budget (mean +- half range over seeds):",
            table(
                ["method", "budget", "seeds", "box AP", "AP50", "training CPU min", "wall min"],
                final_rows(results),
            ),
            "Time to reach each scratch budget's final AP (direct: CPU minutes, ratio to scratch):",
            table(
                ["scratch", "scratch AP", "scratch CPU min"]
                + [f"direct {b}x" for b in BUDGETS]
                + ["best ratio"],
                time_to_ap_rows(results),
            ),
            "Crossings:\n" + "\n".join(f"- {n}" for n in crossing_notes(results) or ["none yet"]),
        ]
    )
    if any(r is not None for r in results.values()):
        plot(results, figure)
    runs = {"/".join(map(str, key)): r for key, r in results.items()}
    save_json(str(out / "results.json"), {"machine": machine(threads), "results": runs})
    (out / "report.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("output/bench/budget_study"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--figure", type=Path, help="plot path (default: OUT/budget_study.png)")
    parser.add_argument(
        "--report-only", action="store_true", help="report the finished runs, train nothing"
    )
    args = parser.parse_args()
    figure = args.figure or args.out / "budget_study.png"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for method, budget, seed in planned():
            if method not in args.methods:
                continue
            try:
                train(args.out, method, budget, seed)
            except subprocess.CalledProcessError:
                folder = run_folder(args.out, method, budget, seed)
                print(f"  FAILED: see {folder / 'stdout.log'}; rerun to resume it", flush=True)
            try:  # a fresh partial report after every run; a failure must not stop the study
                report(args.out, figure)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
    print(report(args.out, figure))
    print(f"\nplot: {figure}\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
