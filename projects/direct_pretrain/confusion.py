"""Confusion matrix of a detector's results at one score threshold, with a background class.

Rows are the true classes plus "background" (a detection that matches no object: a false
detection); columns are the predicted classes plus "background" (an object no detection matches:
a miss). Matching is class-agnostic so that confusions show: per image, detections at or above
the threshold, highest score first, each take the unmatched object they overlap most (IoU at
least ``iou``). Crowd objects are ignored, and so are detections that match only one.
"""

from __future__ import annotations

from collections import defaultdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["confusion_matrix", "plot_confusion"]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x, y, w, h]`` box with each row of ``boxes`` (same format)."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def confusion_matrix(
    ground_truth: dict, results: list[dict], threshold: float, iou: float = 0.5
) -> dict:
    """Counts of true against predicted classes, background included.

    Args:
        ground_truth: a COCO dataset dict (``images``, ``annotations``, ``categories``).
        results: COCO detection results (``image_id``, ``category_id``, ``bbox``, ``score``).
        threshold: lowest score of the detections counted.
        iou: lowest IoU of a match.

    Returns:
        ``{"classes": [names..., "background"], "matrix": rows of counts (true class, then
        background) by columns (predicted class, then background), "threshold", "iou"}``.
    """
    categories = sorted(ground_truth["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    background = len(categories)
    matrix = np.zeros((background + 1, background + 1), dtype=int)
    objects = defaultdict(list)
    for ann in ground_truth["annotations"]:
        objects[ann["image_id"]].append(ann)
    detections = defaultdict(list)
    for det in results:
        if det["score"] >= threshold:
            detections[det["image_id"]].append(det)
    for image in ground_truth["images"]:
        anns = objects.get(image["id"], [])
        boxes = np.array([a["bbox"] for a in anns], dtype=float).reshape(-1, 4)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        taken = np.zeros(len(anns), dtype=bool)
        for det in sorted(detections.get(image["id"], []), key=lambda d: -d["score"]):
            predicted = index[det["category_id"]]
            overlaps = _iou(np.asarray(det["bbox"], dtype=float), boxes)
            free = np.where(~taken & ~crowd & (overlaps >= iou))[0]
            if len(free):
                best = free[np.argmax(overlaps[free])]
                taken[best] = True
                matrix[index[anns[best]["category_id"]], predicted] += 1
            elif not (crowd & (overlaps >= iou)).any():
                matrix[background, predicted] += 1
        for i in np.where(~taken & ~crowd)[0]:
            matrix[index[anns[i]["category_id"]], background] += 1
    names = [c["name"] for c in categories] + ["background"]
    return {"classes": names, "matrix": matrix.tolist(), "threshold": threshold, "iou": iou}


def plot_confusion(confusion: dict, path) -> None:
    """Draw a :func:`confusion_matrix` result with its counts into ``path`` (PNG)."""
    matrix = np.asarray(confusion["matrix"])
    names = confusion["classes"]
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=color)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (background: missed object)")
    ax.set_ylabel("true (background: false detection)")
    ax.set_title(
        f"Confusion at score >= {confusion['threshold']:.2f}\nIoU >= {confusion['iou']:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
