"""The training set's fingerprint, and each phase's view of its box sizes."""

from __future__ import annotations

import json
import logging

import pytest

from direct_pretrain.config_systems import system_of
from direct_pretrain.data.fingerprint import dataset_fingerprint
from direct_pretrain.preflight import describe_data

from conftest import tiny_cfg


def _record(height, width, boxes, crowd=()):
    anns = [{"bbox": b, "bbox_mode": 1, "category_id": c, "iscrowd": 0} for b, c in boxes]
    anns += [{"bbox": b, "bbox_mode": 1, "category_id": 0, "iscrowd": 1} for b in crowd]
    return {"height": height, "width": width, "annotations": anns}


def _dicts():
    return [
        _record(100, 200, [([0, 0, 10, 10], 0), ([50, 50, 20, 5], 1)], crowd=[[0, 0, 90, 90]]),
        _record(50, 50, [([0, 0, 40, 40], 0)]),
        _record(60, 80, []),
    ]


def test_fingerprint_of_hand_made_dicts():
    fp = dataset_fingerprint(_dicts(), ["tree", "car"])
    assert fp["images"] == 3 and fp["boxes"] == 3  # the crowd box is left out
    assert fp["box_side_px"]["p50"] == 10.0  # sides 10, 10, 40
    assert fp["box_side_relative"]["p50"] == 0.1  # 10/100, 10/100, 40/50
    # numpy's linear percentile of (0.1, 0.1, 0.8): 0.1 + 0.98 * 0.7
    assert fp["box_side_relative"]["p99"] == pytest.approx(0.786, abs=1e-3)
    assert fp["boxes_per_image"] == {"mean": 1.0, "p99": 2.0, "max": 2}
    assert fp["class_counts"] == {"tree": 2, "car": 1}
    assert fp["aspect_ratio_w_h"]["p50"] == 1.0 and fp["aspect_ratio_w_h"]["p99"] > 3.9


def test_each_phase_sees_the_boxes_at_its_scale_and_a_harmful_size_is_named(
    synthetic_data, tmp_path, caplog
):
    cfg = tiny_cfg(synthetic_data, tmp_path)  # 64 px images: PRETRAIN crops at 32, FINETUNE 64
    system = system_of(cfg)
    phases = [system.resolve(cfg, name) for name in ("PRETRAIN", "FINETUNE")]
    dicts = _dicts()
    for d in dicts:
        d["height"] = d["width"] = 64
    with caplog.at_level(logging.INFO):
        figures = describe_data(dicts, phases, ["tree", "car"], tmp_path / "fingerprint.json")
    pre, fine = figures["phases"]["PRETRAIN"], figures["phases"]["FINETUNE"]
    assert pre["box_side_train_px"]["p50"] == 5.0  # 10 px x 32/64 (scale jitter centred on 1)
    assert fine["box_side_train_px"]["p50"] == 10.0 and fine["box_side_test_px"]["p50"] == 10.0
    assert pre["share_under_8px_train"] == pytest.approx(2 / 3, abs=1e-3)
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == figures
    assert "DIRECT_PRETRAIN.PRETRAIN.SCALE = (32, 32) shrinks 67% of the training boxes" in (
        caplog.text
    )
    assert "DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN" not in caplog.text  # 10 px: no warning
