"""Detections matched to the ground truth, and what follows from it: precision-recall and
F1-vs-score curves per class, and the score threshold that maximises F1.

Matching, in plain numpy (COCO's rule at one IoU threshold, all object sizes, no limit on the
detections per image): per image and class, detections in descending score order each take the
not yet matched ground-truth box of their class with the highest IoU, if that IoU is at least
``iou`` (a true positive); a detection without one is a false positive, unless it lies on a
crowd box of its class (intersection over the detection's area at least ``iou``, as COCO):
then it is left out. Crowd boxes are no objects to find.

Greedy matching by score makes the matches of the detections scoring at least ``t`` those of
the full matching, so ``matching.above(t)`` is the matching at the score threshold ``t``: the
detections kept, each with its ground-truth box (``det_gt``), and each ground-truth box with
its detection (``gt_det``, -1: missed), with image ids, classes and boxes. A confusion matrix at
the chosen threshold starts from it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

__all__ = ["Curve", "Matching", "best_threshold", "class_curves", "curve", "match_detections"]

_DETECTION_FIELDS = ("det_image", "det_class", "det_box", "det_score", "det_gt")


@dataclass(frozen=True)
class Matching:
    """Detections of a test set matched to its ground truth at IoU ``iou``.

    Ground-truth boxes (crowd boxes left out) and detections (in descending score order) are
    parallel arrays; boxes are COCO ``[x, y, w, h]``, classes the dataset's category ids.
    """

    iou: float
    class_names: dict[int, str]  # category id -> name, of the ground truth
    gt_image: np.ndarray  # (G,) image id
    gt_class: np.ndarray  # (G,) category id
    gt_box: np.ndarray  # (G, 4)
    det_image: np.ndarray  # (D,)
    det_class: np.ndarray  # (D,)
    det_box: np.ndarray  # (D, 4)
    det_score: np.ndarray  # (D,) descending
    det_gt: np.ndarray  # (D,) index of the matched ground-truth box; -1: a false positive

    @property
    def gt_det(self) -> np.ndarray:
        """(G,) index of the detection matched to each ground-truth box; -1: missed."""
        out = np.full(len(self.gt_class), -1)
        hit = self.det_gt >= 0
        out[self.det_gt[hit]] = np.flatnonzero(hit)
        return out

    def above(self, threshold: float) -> Matching:
        """The matching of the detections scoring at least ``threshold`` (same matches)."""
        kept = int(np.sum(self.det_score >= threshold))  # a prefix: scores descend
        return dataclasses.replace(
            self, **{name: getattr(self, name)[:kept] for name in _DETECTION_FIELDS}
        )


def _boxes(items: list[dict]) -> np.ndarray:
    return np.array([item["bbox"] for item in items], dtype=float).reshape(-1, 4)


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of ``[x, y, w, h]`` boxes; against a crowd box, the intersection over the
    detection's area (COCO)."""
    d0, g0 = dets[:, None, :2], gts[None, :, :2]
    wh = np.clip(
        np.minimum(d0 + dets[:, None, 2:], g0 + gts[None, :, 2:]) - np.maximum(d0, g0), 0, None
    )
    inter = wh[..., 0] * wh[..., 1]
    det_area = dets[:, None, 2] * dets[:, None, 3]
    union = np.where(crowd[None, :], det_area, det_area + gts[None, :, 2] * gts[None, :, 3] - inter)
    return inter / np.maximum(union, 1e-12)


def match_detections(gt: dict, detections: list[dict], iou: float = 0.5) -> Matching:
    """Match COCO results to COCO ground truth (see the module's docstring).

    Args:
        gt: the test set's annotation file as loaded (``images``, ``annotations``,
            ``categories``).
        detections: COCO results (``image_id``, ``category_id``, ``bbox``, ``score``), e.g.
            the evaluator's ``inference/coco_instances_results.json``; those on images or of
            categories the ground truth lacks are left out.
        iou: the lowest IoU of a match.
    """
    images = {image["id"] for image in gt["images"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    anns = [a for a in gt["annotations"] if a["image_id"] in images and a["category_id"] in names]
    dets = [d for d in detections if d["image_id"] in images and d["category_id"] in names]
    dets.sort(key=lambda d: -d["score"])  # stable: equal scores keep the file's order
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    ann_box, det_box = _boxes(anns), _boxes(dets)
    by_key = defaultdict(list)
    for index, a in enumerate(anns):
        by_key[a["image_id"], a["category_id"]].append(index)
    det_ann = np.full(len(dets), -1)  # index into anns
    on_crowd = np.zeros(len(dets), dtype=bool)
    det_keys = defaultdict(list)
    for index, d in enumerate(dets):
        det_keys[d["image_id"], d["category_id"]].append(index)
    for key, group in det_keys.items():
        candidates = np.array(by_key.get(key, []), dtype=int)
        ious = _iou(det_box[group], ann_box[candidates], crowd[candidates])
        taken = crowd[candidates].copy()  # crowd boxes are never matched
        for row, index in enumerate(group):
            free = np.where(taken, -1.0, ious[row])
            best = int(np.argmax(free)) if len(free) else -1
            if best >= 0 and free[best] >= iou:
                det_ann[index], taken[best] = candidates[best], True
            else:
                on_crowd[index] = bool(np.any(crowd[candidates] & (ious[row] >= iou)))
    gt_index = np.cumsum(~crowd) - 1  # ann index -> index among the non-crowd boxes
    det_gt, hit = np.full(len(dets), -1), det_ann >= 0
    det_gt[hit] = gt_index[det_ann[hit]]
    keep = ~on_crowd
    objects = [a for a, c in zip(anns, crowd) if not c]
    return Matching(
        iou=iou,
        class_names=names,
        gt_image=np.array([a["image_id"] for a in objects], dtype=int),
        gt_class=np.array([a["category_id"] for a in objects], dtype=int),
        gt_box=_boxes(objects),
        det_image=np.array([d["image_id"] for d in dets], dtype=int)[keep],
        det_class=np.array([d["category_id"] for d in dets], dtype=int)[keep],
        det_box=det_box[keep],
        det_score=np.array([d["score"] for d in dets], dtype=float)[keep],
        det_gt=det_gt[keep],
    )


@dataclass(frozen=True)
class Curve:
    """Precision, recall and F1 of the detections scoring at least each of ``scores``
    (descending, one point per distinct score)."""

    scores: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


def curve(matching: Matching, category_id: int | None = None) -> Curve:
    """The curve of one class, or with None of all classes together (detections and
    ground-truth boxes of every class pooled, each detection matched within its class)."""
    if category_id is None:
        pick, num_gt = np.ones(len(matching.det_score), dtype=bool), len(matching.gt_class)
    else:
        pick = matching.det_class == category_id
        num_gt = int(np.sum(matching.gt_class == category_id))
    scores = matching.det_score[pick]
    true_positives = np.cumsum(matching.det_gt[pick] >= 0)
    last = np.append(scores[1:] != scores[:-1], True)[: len(scores)]  # of each distinct score
    kept = np.arange(1, len(scores) + 1)[last]
    true_positives, scores = true_positives[last], scores[last]
    precision = true_positives / kept
    recall = true_positives / num_gt if num_gt else np.zeros(len(scores))
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(len(scores)), where=total > 0)
    return Curve(scores, precision, recall, f1)


def class_curves(matching: Matching) -> dict[str, Curve]:
    """The curve of each class of the ground truth, by name, in category id order."""
    return {name: curve(matching, cid) for cid, name in sorted(matching.class_names.items())}


def best_threshold(scored: Curve) -> tuple[float, float] | None:
    """(score threshold, F1) where F1 is highest (the highest such threshold on ties): keeping
    the detections scoring at least the threshold; None if no detection is a true positive."""
    if not len(scored.f1) or scored.f1.max() <= 0:
        return None
    best = int(np.argmax(scored.f1))
    return float(scored.scores[best]), float(scored.f1[best])
