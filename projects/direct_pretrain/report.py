"""A small report of a pipeline run: AP tables, loss curves, AP vs time, precision-recall and
F1 curves, example detections, and which phase's model is the run's final one.

Written to ``OUTPUT_DIR/report/`` by the pipeline (main process) after the last phase.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from .data.images import read_image_checked  # noqa: E402
from .utils.io import atomic_write_text  # noqa: E402

__all__ = [
    "ap_table",
    "budget_table",
    "draw_examples",
    "final_model_text",
    "plot_ap_vs_time",
    "plot_losses",
    "plot_pr_f1",
    "write_report",
]

logger = logging.getLogger(__name__)

LOSS_PREFIX = "loss_"
DRAW_SIZE = 768  # example images are drawn at least this large (longer side, pixels)
AP_KEYS = ("AP", "AP50", "AP75")
SIZE_KEYS = ("APs", "APm", "APl")  # small, medium, large objects (COCO's areas)


def _ap(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def ap_table(summary: dict) -> str:
    """The summary's per-phase box AP (all objects and per object size) as a Markdown table,
    then the final model's phase's AP per class (datasets of more than one class)."""
    lines = [
        "| phase | iterations x batch | box AP | AP50 | AP75 | APs | APm | APl | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, rec in summary["phases"].items():
        ap = " | ".join(_ap(rec.get(k)) for k in AP_KEYS + SIZE_KEYS)
        lines.append(
            f"| {phase} | {rec['iterations']} x {rec['ims_per_batch']} | {ap} | "
            f"{rec['wall_seconds']:.0f} |"
        )
    final = summary.get("final_phase") or (
        list(summary["phases"])[-1] if summary["phases"] else None
    )
    per_class = summary["phases"][final].get("per_class") if final else None
    if per_class:
        lines += [
            "",
            f"Per class ({final}):",
            "",
            "| class | AP | AP50 | AP75 |",
            "|---|---|---|---|",
        ]
        for name, rec in per_class.items():
            lines.append(f"| {name} | {' | '.join(_ap(rec.get(k)) for k in AP_KEYS)} |")
    return "\n".join(lines) + "\n"


def final_model_text(summary: dict) -> str:
    """Which phase's model is the run's final one and why (the validation slice's scores)."""
    phases = list(summary.get("phases") or {})
    if not phases:
        return ""
    final = summary.get("final_phase") or phases[-1]
    held = summary.get("val_slice")
    if not held:
        return f"Final model: {final}'s, the last phase's (no validation slice)."
    where = (
        f"validation slice ({held['images']} of {held['of']} training images of "
        f"{', '.join(held['from'])}, held out of training)"
    )
    scores = ", ".join(f"{p} {_ap(ap)}" for p, ap in held["box_ap"].items())
    if not scores:
        return f"Final model: {final}'s, the last phase's (one detector phase, nothing to choose)."
    if final == phases[-1]:
        return f"Final model: {final}'s, the last phase's. Box AP on the {where}: {scores}."
    return (
        f"**Final model: {final}'s, not the last phase's**: it scores higher on the {where}: "
        f"box AP {scores}. Both models are kept in their phase folders."
    )


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(output_dir: Path, phases: list[str], path: Path) -> None:
    """One panel per phase: every ``loss_*`` and ``total_loss`` against the iteration."""
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rows = [r for r in _metrics(output_dir / phase.lower()) if "total_loss" in r]
        keys = sorted({k for r in rows for k in r if k.startswith(LOSS_PREFIX)})
        for key in ["total_loss", *keys]:
            points = [(r["iteration"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=key, linewidth=1)
        ax.set_title(phase)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ap_vs_time(
    records: dict[str, dict], clock: str = "wall"
) -> dict[str, list[tuple[float, float]]]:
    """Per phase, (pipeline training seconds, box AP) of each evaluation; phases follow each
    other, so a phase's times are offset by the phases before it. ``clock``: "wall" (seconds)
    or "cpu" (CPU seconds of the training process), evaluation excluded either way."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"ap_vs_time: clock = {clock!r} is not 'wall' or 'cpu'")
    seen, total, evals = (
        ("train_seconds", "wall_seconds", "eval_seconds")
        if clock == "wall"
        else ("train_cpu_seconds", "cpu_seconds", "eval_cpu_seconds")
    )
    curves, offset = {}, 0.0
    for phase, rec in records.items():
        points = [
            (offset + e[seen], e["AP"])
            for e in rec.get("eval_history", [])
            if isinstance(e.get("AP"), (int, float))
        ]
        if points:
            curves[phase] = points
        offset += rec[total] - rec[evals]
    return curves


def plot_ap_vs_time(
    curves: dict[str, list[tuple[float, float]]], path: Path, title: str = ""
) -> None:
    """Box AP against cumulative training time, one line per phase."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=phase)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("box AP (each phase at its own test size)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_f1(
    curves: dict[str, Any],
    overall: Any,
    threshold: tuple[float, float] | None,
    iou: float,
    path: Path,
) -> None:
    """Left: precision against recall per class; right: F1 against the score threshold per
    class and for all classes, the F1-best threshold marked.

    Args:
        curves: per class name, its :class:`direct_pretrain.results.Curve` (``scores``,
            ``precision``, ``recall``, ``f1``); computed by the pipeline.
        overall: the curve of all classes together.
        threshold: (score threshold, F1) where the F1 of all classes is highest, or None.
        iou: the IoU of a match.
    """
    fig, (pr_ax, f1_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, c in curves.items():
        pr_ax.plot(c.recall, c.precision, label=name, linewidth=1)
        f1_ax.plot(c.scores, c.f1, label=name, linewidth=1)
    f1_ax.plot(overall.scores, overall.f1, color="black", linewidth=2, label="all classes")
    if threshold is not None:
        f1_ax.axvline(
            threshold[0],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"F1-best {threshold[0]:.2f} (F1 {threshold[1]:.2f})",
        )
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall per class, IoU {iou}")
    f1_ax.set(xlabel="score threshold", ylabel="F1", title=f"F1 against the score, IoU {iou}")
    for ax in (pr_ax, f1_ax):
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_examples(
    predict,
    dataset_name: str,
    image_format: str,
    folder: Path,
    count: int = 4,
    score_thresh: float = 0.5,
) -> list[Path]:
    """Draw ground truth (green) and predictions (red, with scores) on the first images."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = MetadataCatalog.get(dataset_name)
    records = DatasetCatalog.get(dataset_name)
    labelled = [r for r in records if r.get("annotations")]  # show objects if there are any
    paths = []
    for record in (labelled or records)[:count]:
        image = read_image_checked(record["file_name"], "RGB")
        instances = predict(read_image_checked(record["file_name"], image_format))
        keep = instances.scores >= score_thresh
        scale = max(1.0, DRAW_SIZE / max(image.shape[:2]))  # small tiles: draw larger
        vis = Visualizer(image, metadata=metadata, scale=scale)
        gt = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
        if gt:
            vis.overlay_instances(boxes=np.asarray(gt), assigned_colors=[(0, 0.8, 0)] * len(gt))
        boxes = instances.pred_boxes.tensor[keep].numpy()
        out = vis.overlay_instances(
            boxes=boxes,
            labels=[f"{s:.2f}" for s in instances.scores[keep].tolist()],
            assigned_colors=[(0.9, 0, 0)] * len(boxes),
        )
        path = folder / f"{Path(record['file_name']).stem}.png"
        out.save(str(path))
        paths.append(path)
    return paths


# The report's figures, in the order the index shows them, with what each shows.
_FIGURES = (
    ("box_sizes.png", "Box sizes at each phase's training scale, anchor sizes and strides"),
    ("batches_*.jpg", "Training batches as the model receives them (first batch of each phase)"),
    ("loss_curves.png", "Losses"),
    ("ap_vs_time.png", "Box AP against training time"),
    ("pr_f1.png", "Precision-recall and F1 against score (final model, IoU 0.5)"),
    ("confusion.png", "Confusion matrix at the F1-best score threshold"),
    ("examples/*.png", "Validation images: ground truth green, detections red"),
)


def budget_table(budget: dict) -> list[str]:
    """Markdown lines: each phase's planned training minutes against those it used."""
    lines = [
        f"## Budget: {budget['minutes']:g} minutes of training (plan: ../plan.yaml)",
        "",
        "| phase | planned min | used min | evaluation min (not counted) |",
        "|---|---|---|---|",
    ]
    for phase, used in budget["used_seconds"].items():
        planned = budget["planned_seconds"].get(phase, 0.0)
        evaluation = budget["eval_seconds"].get(phase, 0.0)
        lines.append(f"| {phase} | {planned / 60:.1f} | {used / 60:.1f} | {evaluation / 60:.1f} |")
    if budget.get("planning_seconds"):
        lines += [
            "",
            f"Planning (fingerprint, calibration and batch timings, any scale measured on the "
            f"slice): {budget['planning_seconds'] / 60:.1f} min, not counted in the budget.",
        ]
    for phase, measured in (budget.get("measured") or {}).items():
        lines += [
            "",
            f"{phase} scale x{measured['value']:.2f}: {measured['rule']} ({measured['figure']}).",
        ]
    for changes in (budget.get("paced") or {}).values():
        lines += ["", *(f"Re-planned during training: {change}." for change in changes)]
    return lines + [""]


def write_index(folder: str | Path, summary: dict) -> Path:
    """``report/index.md``: the AP tables, warnings and every figure in ``folder``, inline
    (Markdown viewers show the images); written last, so it lists what exists."""
    folder = Path(folder)
    lines = [f"# Run {summary.get('output_dir', folder.parent)}", "", ap_table(summary)]
    lines += [final_model_text(summary), ""]
    for warning in summary.get("warnings") or []:
        lines += [f"> **Warning.** {warning}", ""]
    if summary.get("budget"):
        lines += budget_table(summary["budget"])
    for pattern, title in _FIGURES:
        files = sorted(folder.glob(pattern))
        if files:
            lines += [f"## {title}", ""]
            lines += [f"![{f.stem}]({f.relative_to(folder).as_posix()})" for f in files] + [""]
    path = folder / "index.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_report(
    output_dir: str,
    summary: dict,
    records: dict[str, dict],
    predict=None,
    dataset_name: str = "",
    image_format: str = "BGR",
    pr_f1: dict | None = None,
) -> Path:
    """Write the report of a finished pipeline; return its folder.

    Args:
        output_dir: the pipeline's output folder.
        summary: the pipeline summary (``summary.json``).
        records: per phase, its ``phase_done.json`` record.
        predict: optional callable image (HWC, ``image_format``) -> Instances of the final
            model, to draw example detections on ``dataset_name``.
        pr_f1: the arguments of :func:`plot_pr_f1` but ``path`` (the final model's curves),
            to draw ``pr_f1.png``.
    """
    folder = Path(output_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "ap_table.md", ap_table(summary))
    plot_losses(Path(output_dir), list(records), folder / "loss_curves.png")
    curves = ap_vs_time(records)
    if curves:
        plot_ap_vs_time(curves, folder / "ap_vs_time.png", Path(output_dir).name)
    if pr_f1 is not None:
        plot_pr_f1(**pr_f1, path=folder / "pr_f1.png")
    if predict is not None and dataset_name:
        draw_examples(predict, dataset_name, image_format, folder / "examples")
    logger.info("Report written to %s", folder)
    return folder
