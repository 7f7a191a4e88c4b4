"""COCO box AP of detections on (some of) the images of a ground truth, as pycocotools computes
it, without its printing: the one evaluation behind whole-image prediction scores and the
final choice's paired jackknife."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["box_ap"]


def box_ap(
    gt: COCO, detections: COCO, images: list[int] | None = None, max_dets: int = 100
) -> dict[str, float]:
    """Box AP, AP50 and AP75 (percent, as Detectron2 reports them) of ``detections`` (loaded
    with ``gt.loadRes``) on ``images`` of ``gt`` (default: all), ``max_dets`` detections per
    image; NaN where those images hold no object."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluator = COCOeval(gt, detections, "bbox")
        if images is not None:
            evaluator.params.imgIds = images
        evaluator.params.maxDets = [max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision[iou threshold, recall, class, area range ("all" first), max detections]
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    ious = list(np.round(evaluator.params.iouThrs, 2))
    return {
        "AP": _mean_percent(precision),
        "AP50": _mean_percent(precision[ious.index(0.5)]),
        "AP75": _mean_percent(precision[ious.index(0.75)]),
    }


def _mean_percent(precision: np.ndarray) -> float:
    """Mean precision in percent over the entries that exist (-1: no object annotated)."""
    valid = precision[precision > -1]
    return 100.0 * float(valid.mean()) if valid.size else float("nan")
