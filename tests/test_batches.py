"""The batch browser: a phase's first training batches as the model receives them."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from direct_pretrain.batches import COLUMNS, GAP, draw_batches, first_batches
from direct_pretrain.config_systems import phase_config
from direct_pretrain.data.datasets import register_datasets

from conftest import ROOT, tiny_cfg, write_config

BRIGHT = 140  # synthetic objects are >= 150 in every channel; background < 60, padding ~114


def test_boxes_cover_the_objects_after_the_phase_augmentation(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    pcfg = phase_config(cfg, "PRETRAIN", 8)
    state = np.random.get_state()
    inputs = [x for batch in first_batches(pcfg, num_batches=2) for x in batch]
    assert np.array_equal(np.random.get_state()[1], state[1])  # the training's order is kept
    assert len(inputs) == 8
    inner_boxes = 0
    for x in inputs:
        darkest = x["image"].numpy().min(axis=0).astype(int)
        assert darkest.shape == (32, 32)  # the phase's 32 px crops
        covered = np.zeros_like(darkest, dtype=bool)
        for x0, y0, x1, y1 in x["instances"].gt_boxes.tensor.tolist():
            # 2 px around the box: the resize blurs the object's edge
            top, left = max(0, math.floor(y0) - 2), max(0, math.floor(x0) - 2)
            covered[top : math.ceil(y1) + 2, left : math.ceil(x1) + 2] = True
            inner = darkest[
                math.ceil(y0) + 1 : math.floor(y1) - 1, math.ceil(x0) + 1 : math.floor(x1) - 1
            ]
            if inner.size:
                assert inner.min() > BRIGHT, "a box holds background"
                inner_boxes += 1
        assert (darkest[~covered] < BRIGHT).all(), "an object lies outside every box"
    assert inner_boxes >= 8


def test_grid_has_one_tile_per_image(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    path = draw_batches(phase_config(cfg, "PRETRAIN", 8), tmp_path / "b.jpg", num_batches=2)
    # 2 batches of 4 images, 32 px drawn 8x: 2 rows of 4 tiles of 256 px
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.size == (COLUMNS * 256 + 3 * GAP, 2 * 256 + GAP)


def test_box_domain_draws_both_views(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    path = draw_batches(phase_config(cfg, "BOX_DOMAIN", 8), tmp_path / "b.jpg")
    # 2 images of at most 64 px, two views each, drawn 4x
    with Image.open(path) as image:
        assert image.size == (4 * 256 + 3 * GAP, 256)


def test_browse_data_writes_the_batches_and_trains_nothing(synthetic_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tiny_cfg(synthetic_data, run), tmp_path / "config.yaml")
    out = tmp_path / "browse"
    result = subprocess.run(
        [sys.executable, "tools/browse_data.py", "--config-file", str(config)]
        + ["--phase", "PRETRAIN", "--output", str(out), "SEED", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "projects")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(out / "batches_PRETRAIN.jpg")
    # the batches, and the training set's sizes as each phase sees them (as a run logs them,
    # with the box-size figure)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["batches_PRETRAIN.jpg", "fingerprint.json", "report"]
    assert [p.name for p in (out / "report").iterdir()] == ["box_sizes.png"]
    assert [p.name for p in run.iterdir()] == ["cache"]  # the tiny config's CACHE_DIR only
