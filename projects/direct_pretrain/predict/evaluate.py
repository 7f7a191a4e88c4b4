"""COCO box AP of prediction results against annotations (e.g. of whole, un-tiled images)."""

from __future__ import annotations

import contextlib
import copy
import io

from pycocotools.coco import COCO

from ..data.box_ap import box_ap

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
        detections = gt.loadRes(copy.deepcopy(results))
    return box_ap(gt, detections, max_dets=max_dets)
