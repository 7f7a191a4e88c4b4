"""A small report of a pipeline run: AP table, loss curves, AP vs time, example detections.

Written to ``OUTPUT_DIR/report/`` by the pipeline (main process) after the last phase.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

from .data.images import read_image_checked  # noqa: E402
from .utils.io import atomic_write_text  # noqa: E402

__all__ = ["ap_table", "plot_ap_vs_time", "plot_losses", "draw_examples", "write_report"]

logger = logging.getLogger(__name__)

LOSS_PREFIX = "loss_"
DRAW_SIZE = 768  # example images are drawn at least this large (longer side, pixels)


def ap_table(summary: dict) -> str:
    """The summary's per-phase box AP as a Markdown table."""
    lines = [
        "| phase | iterations x batch | box AP | AP50 | AP75 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for phase, rec in summary["phases"].items():
        ap = [
            f"{rec[k]:.1f}" if isinstance(rec.get(k), (int, float)) else "-"
            for k in ("AP", "AP50", "AP75")
        ]
        lines.append(
            f"| {phase} | {rec['iterations']} x {rec['ims_per_batch']} | "
            f"{' | '.join(ap)} | {rec['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


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


def write_report(
    output_dir: str,
    summary: dict,
    records: dict[str, dict],
    predict=None,
    dataset_name: str = "",
    image_format: str = "BGR",
) -> Path:
    """Write the report of a finished pipeline; return its folder.

    Args:
        output_dir: the pipeline's output folder.
        summary: the pipeline summary (``summary.json``).
        records: per phase, its ``phase_done.json`` record.
        predict: optional callable image (HWC, ``image_format``) -> Instances of the final
            model, to draw example detections on ``dataset_name``.
    """
    folder = Path(output_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "ap_table.md", ap_table(summary))
    plot_losses(Path(output_dir), list(records), folder / "loss_curves.png")
    curves = ap_vs_time(records)
    if curves:
        plot_ap_vs_time(curves, folder / "ap_vs_time.png", Path(output_dir).name)
    if predict is not None and dataset_name:
        draw_examples(predict, dataset_name, image_format, folder / "examples")
    logger.info("Report written to %s", folder)
    return folder
