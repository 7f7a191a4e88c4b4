"""A dataset's fingerprint: the sizes of its images and boxes, what a plan is made from.

Computed from the dataset dicts alone (no image is read): image sizes, box sides
(``sqrt(w * h)``) in pixels and relative to the image's short side, boxes per image, class
counts and box aspect ratios. It costs a pass over the annotations (milliseconds for
thousands of boxes; 3 s for a COCO-sized 118k images and 826k boxes, measured 2026-11-30 on 2
shared cores), less than loading those annotations, which every run does anyway to train: it is
computed afresh for every run rather than cached.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["PERCENTILES", "box_sides", "box_sizes", "dataset_fingerprint"]

PERCENTILES = (1, 5, 10, 50, 90, 99)


def box_sizes(dicts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Each non-crowd box's ``(width, height)`` in pixels (an ``(N, 2)`` array), and the index
    of its image."""
    sizes, images = [], []
    for i, record in enumerate(dicts):
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = _xyxy(ann)
            sizes.append((max(x1 - x0, 0.0), max(y1 - y0, 0.0)))
            images.append(i)
    return np.asarray(sizes, dtype=float).reshape(-1, 2), np.asarray(images, dtype=int)


def box_sides(dicts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Each non-crowd box's side ``sqrt(w * h)`` in pixels, and the index of its image."""
    sizes, images = box_sizes(dicts)
    return np.sqrt(sizes[:, 0] * sizes[:, 1]), images


def dataset_fingerprint(dicts: list[dict], class_names: list[str] | None = None) -> dict:
    """Image sizes, box-side percentiles (pixels and relative to the short side), boxes per
    image, class counts and aspect ratios of a dataset's dicts (Detectron2's format)."""
    heights = np.asarray([d["height"] for d in dicts], dtype=float)
    widths = np.asarray([d["width"] for d in dicts], dtype=float)
    sides, images = box_sides(dicts)
    short = np.minimum(heights, widths)
    per_image = np.bincount(images, minlength=len(dicts)) if len(dicts) else np.zeros(0)
    ratios, classes = [], Counter()
    for record in dicts:
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = _xyxy(ann)
            if y1 > y0:
                ratios.append((x1 - x0) / (y1 - y0))
            classes[ann["category_id"]] += 1

    def percentiles(values) -> dict:
        if not len(values):
            return {}
        return {f"p{p}": round(float(np.percentile(values, p)), 3) for p in PERCENTILES}

    names = class_names or []
    return {
        "images": len(dicts),
        "boxes": int(len(sides)),
        "image_height": percentiles(heights),
        "image_width": percentiles(widths),
        "box_side_px": percentiles(sides),
        "box_side_relative": percentiles(sides / short[images]) if len(sides) else {},
        "boxes_per_image": {
            "mean": round(float(per_image.mean()), 2) if len(per_image) else 0.0,
            "p99": round(float(np.percentile(per_image, 99)), 1) if len(per_image) else 0.0,
            "max": int(per_image.max()) if len(per_image) else 0,
        },
        "class_counts": {
            (names[k] if k < len(names) else str(k)): v for k, v in sorted(classes.items())
        },
        "aspect_ratio_w_h": percentiles(ratios),
    }


def _xyxy(ann: dict) -> tuple[float, float, float, float]:
    """A Detectron2 annotation's box as (x0, y0, x1, y1) (XYXY_ABS or XYWH_ABS modes)."""
    x0, y0, a, b = (float(v) for v in ann["bbox"])
    if int(ann.get("bbox_mode", 1)) == 0:  # BoxMode.XYXY_ABS
        return x0, y0, a, b
    return x0, y0, x0 + a, y0 + b
