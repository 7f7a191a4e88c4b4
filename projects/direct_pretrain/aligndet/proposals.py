"""Pseudo-boxes for box-domain pre-training: selective search (cached) or a user's file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from torchvision.ops import nms

from ..utils.io import atomic_write_json

__all__ = ["filter_boxes", "load_proposals", "selective_search"]

logger = logging.getLogger(__name__)


def selective_search(image: np.ndarray, max_side: int) -> np.ndarray:
    """Selective-search boxes (N, 4) XYXY of a BGR image, in the algorithm's order.

    Needs OpenCV's contrib modules (``opencv-contrib-python-headless``).
    """
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError(
            "selective search needs OpenCV's contrib modules: install "
            "opencv-contrib-python-headless (instead of opencv-python), or give your own "
            "pseudo-boxes with ALIGNDET.PROPOSALS.FILE"
        )
    cv2.setNumThreads(1)
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image)
    search.switchToSelectiveSearchFast()
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)
    rects[:, 2:] += rects[:, :2]
    return rects / scale


def filter_boxes(boxes: np.ndarray, width: int, height: int, node: CfgNode) -> np.ndarray:
    """Drop thin and tiny boxes, suppress duplicates, keep the first ``MAX_PER_IMAGE``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    keep = (short >= node.MIN_RELATIVE_SIZE * max(width, height)) & (
        long_ <= node.MAX_ASPECT_RATIO * np.maximum(short, 1e-6)
    )
    boxes = boxes[keep]
    if len(boxes) == 0:
        return boxes
    rank = torch.arange(len(boxes), 0, -1, dtype=torch.float32)  # earlier ranks higher
    kept = nms(torch.as_tensor(boxes, dtype=torch.float32), rank, node.NMS_THRESH)
    return boxes[kept.numpy()][: node.MAX_PER_IMAGE]


def _search_one(args) -> list[list[float]]:
    from detectron2.data.detection_utils import read_image

    file_name, max_side, node = args
    image = read_image(file_name, format="BGR")
    boxes = selective_search(image, max_side)
    return filter_boxes(boxes, image.shape[1], image.shape[0], node).round(1).tolist()


def _read_user_file(path: str, file_names: list[str]) -> dict[str, list]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"ALIGNDET.PROPOSALS.FILE '{path}' cannot be read as JSON: {e}") from e
    by_base = {os.path.basename(k): v for k, v in data.items()}
    missing = [n for n in file_names if n not in data and os.path.basename(n) not in by_base]
    if missing:
        raise KeyError(
            f"ALIGNDET.PROPOSALS.FILE '{path}' has no boxes for {len(missing)} "
            f"training image(s), e.g. {missing[:3]}"
        )
    return {n: data.get(n, by_base.get(os.path.basename(n))) for n in file_names}


def load_proposals(dicts: list[dict], node: CfgNode, cache_dir: Path) -> dict[str, np.ndarray]:
    """Pseudo-boxes of every training image: ``{file_name: (N, 4) XYXY array}``.

    From ``node.FILE`` if given (filtered like selective-search boxes), else computed with
    selective search once and cached under ``cache_dir`` by the image list and the settings.
    """
    names = [d["file_name"] for d in dicts]
    sizes = {d["file_name"]: (d["width"], d["height"]) for d in dicts}
    if node.FILE:
        raw = _read_user_file(node.FILE, names)
        return {
            n: filter_boxes(np.asarray(b, dtype=np.float64), *sizes[n], node)
            for n, b in raw.items()
        }
    key = hashlib.sha256(json.dumps([sorted(names), node.dump()]).encode()).hexdigest()[:16]
    cache = cache_dir / "proposals" / f"selective_search-{key}.json"
    if cache.is_file():
        boxes = json.loads(cache.read_text())
    else:
        workers = node.NUM_WORKERS or os.cpu_count() or 1
        logger.info(
            "Selective search on %d images with %d processes (once; cached in %s)",
            len(names),
            workers,
            cache,
        )
        jobs = [(n, node.SEARCH_MAX_SIDE, node) for n in names]
        if workers == 1:
            found = [_search_one(job) for job in jobs]
        else:
            with ProcessPoolExecutor(workers) as pool:
                found = list(pool.map(_search_one, jobs, chunksize=8))
        boxes = dict(zip(names, found))
        atomic_write_json(cache, boxes)
    counts = [len(b) for b in boxes.values()]
    logger.info(
        "Pseudo-boxes: %d images, %.1f boxes per image on average",
        len(counts),
        float(np.mean(counts)) if counts else 0.0,
    )
    return {n: np.asarray(b, dtype=np.float64).reshape(-1, 4) for n, b in boxes.items()}
