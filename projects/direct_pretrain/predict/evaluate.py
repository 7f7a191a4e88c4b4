"""COCO box AP of prediction results against annotations (e.g. of whole, un-tiled images)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["coco_box_ap"]


def coco_box_ap(ground_truth: dict, results: list[dict], max_dets: int = 100) -> dict:
    """Box AP, AP50 and AP75 (percent, as Detectron2 reports them) of COCO ``results``.

    Args:
        ground_truth: a COCO dataset dict; result ``image_id``s refer to its images.
        results: COCO detection results (``image_id``, ``category_id``, ``bbox``, ``score``).
        max_dets: detections per image evaluated (COCO's default is 100; a large image
            with many objects needs more).

    Returns:
        ``{"AP", "AP50", "AP75"}``; NaN where the annotations hold no object.
    """
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = copy.deepcopy(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, "bbox")
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
