"""Shared fixtures: a tiny synthetic COCO dataset and a tiny R-18 Faster R-CNN config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from direct_pretrain import get_cfg

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic_coco(folder: Path, num_images: int, size: int, seed: int) -> Path:
    """Dark images with bright rectangles (the objects), as a one-class COCO json."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.integers(size // 6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y : y + h, x : x + w] = rng.integers(150, 255, 3, dtype=np.uint8)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "bbox": [int(x), int(y), int(w), int(h)], "area": int(w * h),
                                "iscrowd": 0, "category_id": 1})
        name = f"img{i:03d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    json_file = folder / "annotations.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "box"}]}))
    return json_file


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """``{"train"|"val": (json_file, image_root)}`` of a tiny synthetic dataset."""
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for split, count, seed in (("train", 8, 0), ("val", 3, 1)):
        json_file = write_synthetic_coco(root / split, count, 64, seed)
        out[split] = (str(json_file), str(root / split / "images"))
    return out


def tiny_cfg(synthetic_data, output_dir: Path, cache_dir: Path | None = None):
    """A pipeline config small enough to train a few iterations in seconds on CPU."""
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml"))
    cfg.DIRECT_PRETRAIN.REGISTER_COCO = [
        ["tiny_train", *synthetic_data["train"]], ["tiny_val", *synthetic_data["val"]]
    ]
    cfg.DATASETS.TRAIN = ("tiny_train",)
    cfg.DATASETS.TEST = ("tiny_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.DIRECT_PRETRAIN.CACHE_DIR = str(cache_dir or output_dir / "cache")
    for phase, size, batch in (("PRETRAIN", 32, 4), ("FINETUNE", 64, 2)):
        node = cfg.DIRECT_PRETRAIN[phase]
        node.SCALE = (size, size)
        node.CROP_SIZE = (size, size)
        node.MIN_SIZE_TRAIN = (size,)
        node.MAX_SIZE_TRAIN = size
        node.MIN_SIZE_TEST = size
        node.MAX_SIZE_TEST = size
        node.IMS_PER_BATCH = batch
        node.MAX_ITER = 2
        node.WARMUP_ITERS = 1
        node.ROI_BATCH_SIZE_PER_IMAGE = 32
        node.CHECKPOINT_PERIOD = 1
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
