"""Per-class and per-size AP in summary.json and the report; detections matched to the ground
truth, precision-recall and F1 curves and the F1-best score threshold saved for prediction."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from direct_pretrain.confusion import confusion_matrix
from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.results import best_threshold, class_curves, curve, match_detections

from conftest import tiny_cfg, write_synthetic_coco

NAMES = ["box", "box2", "box3"]


def _gt(objects: list, crowds: list = (), images: int = 1, classes: int = 1) -> dict:
    """COCO ground truth: objects and crowd boxes as (image id, [x, y, w, h], category id)."""
    boxes = [(*o, 0) for o in objects] + [(*c, 1) for c in crowds]
    return {
        "images": [{"id": i} for i in range(1, images + 1)],
        "categories": [{"id": c, "name": NAMES[c - 1]} for c in range(1, classes + 1)],
        "annotations": [
            {"id": k, "image_id": i, "bbox": box, "category_id": c, "iscrowd": crowd}
            for k, (i, box, c, crowd) in enumerate(boxes, 1)
        ],
    }


def _det(image: int, box: list[float], score: float, category: int = 1) -> dict:
    return {"image_id": image, "bbox": box, "score": score, "category_id": category}


def test_f1_best_threshold_on_hand_made_detections():
    # Three objects A, B, C; four detections, in score order:
    #   0.9 on A (IoU 1): TP    0.8 on A again (IoU 90/110): FP, A is taken
    #   0.6 on B (IoU 1): TP    0.3 over C, too tall (IoU 100/250 = 0.4): FP
    gt = _gt([(1, [0, 0, 10, 10], 1), (1, [20, 20, 10, 10], 1), (1, [40, 40, 10, 10], 1)])
    dets = [
        _det(1, [40, 40, 10, 25], 0.3),
        _det(1, [1, 0, 10, 10], 0.8),
        _det(1, [0, 0, 10, 10], 0.9),
        _det(1, [20, 20, 10, 10], 0.6),
    ]
    # Keeping the scores >= t:            TP FP  precision  recall  F1 = 2PR / (P + R)
    #   t = 0.9                            1  0   1          1/3     (2/3) / (4/3) = 1/2
    #   t = 0.8                            1  1   1/2        1/3     (1/3) / (5/6) = 2/5
    #   t = 0.6                            2  1   2/3        2/3     2/3            (best)
    #   t = 0.3                            2  2   1/2        2/3     (2/3) / (7/6) = 4/7
    matching = match_detections(gt, dets)
    assert matching.det_gt.tolist() == [0, -1, 1, -1]
    overall = curve(matching)
    assert overall.scores.tolist() == [0.9, 0.8, 0.6, 0.3]
    assert overall.precision == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2])
    assert overall.recall == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert overall.f1 == pytest.approx([1 / 2, 2 / 5, 2 / 3, 4 / 7])
    assert best_threshold(overall) == pytest.approx((0.6, 2 / 3))
    # The matching at the threshold (what a confusion matrix starts from): the first three
    # detections; A and B found, C missed.
    kept = matching.above(0.6)
    assert kept.det_score.tolist() == [0.9, 0.8, 0.6] and kept.det_gt.tolist() == [0, -1, 1]
    assert kept.gt_det.tolist() == [0, 2, -1]


def test_matching_keeps_classes_apart_and_leaves_crowds_and_other_images_out():
    objects = [(1, [0, 0, 10, 10], 1), (1, [20, 0, 10, 10], 2)]
    gt = _gt(objects, crowds=[(2, [0, 0, 50, 50], 1)], images=2, classes=2)
    dets = [
        _det(1, [0, 0, 10, 10], 0.9, category=2),  # class 2 on the class-1 object: FP
        _det(1, [20, 0, 10, 20], 0.8, category=2),  # IoU exactly 0.5: TP
        _det(1, [0, 0, 10, 10], 0.7, category=1),  # TP
        _det(2, [10, 10, 20, 20], 0.95, category=1),  # inside a crowd box: left out
        _det(3, [0, 0, 10, 10], 0.99, category=1),  # an image the ground truth lacks
        _det(1, [0, 0, 10, 10], 0.99, category=7),  # a category the ground truth lacks
    ]
    matching = match_detections(gt, dets)
    assert matching.gt_class.tolist() == [1, 2]  # the crowd box is no object to find
    assert matching.det_score.tolist() == [0.9, 0.8, 0.7]
    assert matching.det_gt.tolist() == [-1, 1, 0]
    curves = class_curves(matching)
    assert list(curves) == ["box", "box2"]
    assert curves["box"].f1.tolist() == [1.0]
    assert curves["box2"].precision.tolist() == [0.0, 0.5] and curves["box2"].f1[-1] == 2 / 3
    # All classes at 0.7: 2 TP, 1 FP, 2 objects: P = 2/3, R = 1, F1 = (4/3) / (5/3) = 4/5
    assert best_threshold(curve(matching)) == pytest.approx((0.7, 4 / 5))
    assert best_threshold(curve(match_detections(gt, dets[:1]))) is None  # no true positive
    empty = match_detections({**gt, "annotations": []}, dets)  # no objects, no crowd box
    assert empty.det_gt.tolist() == [-1] * 4 and best_threshold(curve(empty)) is None


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny two-phase run on a 3-class synthetic set: its folder and the pipeline's log."""
    root = tmp_path_factory.mktemp("three_classes")
    data = {}
    for split, count, seed in (("train", 8, 0), ("val", 3, 1)):
        json_file = write_synthetic_coco(root / split, count, 64, seed, num_classes=3)
        data[split] = (str(json_file), str(root / split / "images"))
    cfg = tiny_cfg(data, root / "run")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model: keep every detection
    handler, logger = _Lines(), logging.getLogger("direct_pretrain")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run_pipeline(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return root / "run", handler.lines


def _same(a, b) -> bool:
    """Equal numbers, or both NaN/None (JSON keeps NaN as null)."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == pytest.approx(b)


def test_per_class_and_per_size_ap_in_summary_report_and_log(three_class_run):
    run, lines = three_class_run
    saved = json.loads((run / "summary.json").read_text())
    for phase in ("PRETRAIN", "FINETUNE"):
        record = saved["phases"][phase]
        bbox = json.loads((run / phase.lower() / "phase_done.json").read_text())["results"]["bbox"]
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert _same(record[key], bbox[key]), (phase, key)  # Detectron2's values
        assert list(record["per_class"]) == NAMES
        for name in NAMES:
            assert set(record["per_class"][name]) == {"AP", "AP50", "AP75"}
            assert _same(record["per_class"][name]["AP"], bbox[f"AP-{name}"])  # Detectron2's
    # AP50 and AP75 per class, read from the evaluation's precision array, as pycocotools
    # computes them from the final phase's saved detections.
    gt = COCO(str(run.parent / "val" / "annotations.json"))
    evaluation = COCOeval(
        gt, gt.loadRes(str(run / "finetune" / "inference" / "coco_instances_results.json")), "bbox"
    )
    evaluation.evaluate()
    evaluation.accumulate()
    for t, key in ((0, "AP50"), (5, "AP75")):
        for k, name in enumerate(NAMES):
            precision = evaluation.eval["precision"][t, :, k, 0, -1]
            precision = precision[precision > -1]
            expected = float(np.mean(precision)) * 100 if precision.size else None
            assert _same(saved["phases"]["FINETUNE"]["per_class"][name][key], expected)
    table = (run / "report" / "ap_table.md").read_text()
    assert (
        "| phase | iterations x batch | box AP | AP50 | AP75 | APs | APm | APl | wall s |" in table
    )
    assert "Per class (FINETUNE):" in table and all(f"| {name} |" in table for name in NAMES)
    assert any("Per class (FINETUNE):" in line and "| box3 |" in line for line in lines)


def test_pr_f1_curves_and_the_saved_score_threshold(three_class_run):
    run, lines = three_class_run
    assert (run / "report" / "pr_f1.png").stat().st_size > 1000
    gt = json.loads((run.parent / "val" / "annotations.json").read_text())
    dets = json.loads((run / "finetune" / "inference" / "coco_instances_results.json").read_text())
    best = best_threshold(curve(match_detections(gt, dets, 0.5)))
    path = run / "predict_threshold.json"
    if best is None:  # no detection of the tiny model is right: predict.py keeps 0.5
        assert not path.exists()
        return
    assert json.loads(path.read_text()) == {
        "score_threshold": best[0],
        "f1": best[1],
        "iou": 0.5,
        "dataset": "tiny_val",
        "phase": "FINETUNE",
    }
    assert any(line.startswith("F1-best score threshold on tiny_val") for line in lines)


def test_confusion_matrix_at_the_saved_threshold_in_summary_and_report(three_class_run):
    run, _ = three_class_run
    saved = run / "predict_threshold.json"
    summary = json.loads((run / "summary.json").read_text())
    if not saved.exists():  # no threshold, no confusion matrix
        assert summary["confusion"] is None
        return
    gt = json.loads((run.parent / "val" / "annotations.json").read_text())
    dets = json.loads((run / "finetune" / "inference" / "coco_instances_results.json").read_text())
    threshold = json.loads(saved.read_text())["score_threshold"]
    assert summary["confusion"] == confusion_matrix(gt, dets, threshold)
    assert summary["confusion"]["classes"] == ["box", "box2", "box3", "background"]
    objects = sum(not a.get("iscrowd", 0) for a in gt["annotations"])
    assert sum(sum(row) for row in summary["confusion"]["matrix"][:3]) == objects
    assert (run / "report" / "confusion.png").stat().st_size > 1000
