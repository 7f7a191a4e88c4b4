"""Pseudo-boxes for box-domain pre-training: selective search (cached) or a user's file.

The filter is SoCo's ``ratio3size0008`` as AlignDet's proposal file is named after
(``selective_search/filter_ss_proposals_json.py`` and ``filters.py:filter_ratio_size`` in
hologerry/SoCo): both sides >= 32 px, 1/3 <= w/h <= 3 and 0.0 <= sqrt(box area / image area)
<= 0.8; then non-maximum suppression at 0.5 (our reading of the file's "@0.5" suffix).
"""

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

from ..utils.dist import build_on_main
from ..utils.io import atomic_write_json

__all__ = ["filter_boxes", "load_proposals", "max_per_image", "selective_search"]

logger = logging.getLogger(__name__)

SEARCH_MODES = ("single", "fast", "quality")
# The public RetinaNet recipe keeps the first 50 pseudo-boxes of an image (GPU memory).
RETINANET_TOPK = 50


def selective_search(
    image: np.ndarray, mode: str = "single", max_side: int = 0, k: int = 300, sigma: float = 0.9
) -> np.ndarray:
    """Selective-search boxes (N, 4) XYXY of a BGR image, in OpenCV's order.

    Args:
        image: HxWx3 BGR uint8.
        mode: "single" (one HSV strategy: Felzenszwalb with ``k``/``sigma``, colour, texture,
            size and fill similarities), or OpenCV's "fast" / "quality" presets.
        max_side: search on the image downscaled to this longer side (0: full resolution).

    Needs OpenCV's contrib modules (``opencv-contrib-python-headless``).
    """
    import cv2

    if not hasattr(cv2, "ximgproc"):
        raise RuntimeError(
            "selective search needs OpenCV's contrib modules: install "
            "opencv-contrib-python-headless (instead of opencv-python), or give your own "
            "pseudo-boxes with ALIGNDET.PROPOSALS.FILE"
        )
    if mode not in SEARCH_MODES:
        raise ValueError(
            f"ALIGNDET.PROPOSALS.SEARCH_MODE = '{mode}' is not one of {', '.join(SEARCH_MODES)}"
        )
    cv2.setNumThreads(1)
    scale = min(1.0, max_side / max(image.shape[:2])) if max_side > 0 else 1.0
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image)
    if mode == "single":
        search.switchToSingleStrategy(int(k), float(sigma))
    elif mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)
    rects[:, 2:] += rects[:, :2]
    return rects / scale


def filter_boxes(boxes: np.ndarray, width: int, height: int, node: CfgNode) -> np.ndarray:
    """SoCo's size/aspect filter, then NMS (earlier boxes win); all survivors, in order."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    relative = np.sqrt(w * h / (width * height))
    ratio = node.MAX_ASPECT_RATIO
    keep = (
        (w >= node.MIN_SIDE)
        & (h >= node.MIN_SIDE)
        & (w <= ratio * h)
        & (h <= ratio * w)
        & (relative >= node.MIN_RELATIVE_SIZE)
        & (relative <= node.MAX_RELATIVE_SIZE)
    )
    boxes = boxes[keep]
    if len(boxes) == 0 or node.NMS_THRESH >= 1.0:
        return boxes
    rank = torch.arange(len(boxes), 0, -1, dtype=torch.float32)  # earlier ranks higher
    kept = nms(torch.as_tensor(boxes, dtype=torch.float32), rank, node.NMS_THRESH)
    return boxes[np.sort(kept.numpy())]


def max_per_image(cfg: CfgNode) -> int:
    """Pseudo-boxes used per image (0: all): ``MAX_PER_IMAGE``, or the public code's choice."""
    value = cfg.ALIGNDET.PROPOSALS.MAX_PER_IMAGE
    if value >= 0:
        return value
    return RETINANET_TOPK if cfg.MODEL.META_ARCHITECTURE.endswith("RetinaNet") else 0


def _search_one(args) -> list[list[float]]:
    from detectron2.data.detection_utils import read_image

    file_name, node = args
    image = read_image(file_name, format="BGR")
    boxes = selective_search(
        image, node.SEARCH_MODE, node.SEARCH_MAX_SIDE, node.SEARCH_K, node.SEARCH_SIGMA
    )
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


def _search_cache(names: list[str], node: CfgNode, cache_dir: Path) -> Path:
    settings = {k: v for k, v in node.items() if k not in ("FILE", "MAX_PER_IMAGE", "NUM_WORKERS")}
    key = hashlib.sha256(json.dumps([sorted(names), settings], sort_keys=True).encode())
    return cache_dir / "proposals" / f"selective_search-{key.hexdigest()[:16]}.json"


def _compute_or_read(names: list[str], node: CfgNode, cache: Path) -> dict[str, list]:
    if cache.is_file():
        return json.loads(cache.read_text())
    workers = node.NUM_WORKERS or os.cpu_count() or 1
    logger.info(
        "Selective search (%s) on %d images with %d processes (once; cached in %s)",
        node.SEARCH_MODE,
        len(names),
        workers,
        cache,
    )
    jobs = [(n, node) for n in names]
    if workers == 1:
        found = [_search_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            found = list(pool.map(_search_one, jobs, chunksize=8))
    boxes = dict(zip(names, found))
    atomic_write_json(cache, boxes)
    return boxes


def load_proposals(dicts: list[dict], node: CfgNode, cache_dir: Path) -> dict[str, np.ndarray]:
    """Pseudo-boxes of every training image: ``{file_name: (N, 4) XYXY array}``, all survivors.

    From ``node.FILE`` if given (filtered like selective-search boxes), else computed with
    selective search once, by the main process while the others wait (every process raises if
    it fails), and cached under ``cache_dir`` by the image list and the settings.
    """
    names = [d["file_name"] for d in dicts]
    if node.FILE:
        sizes = {d["file_name"]: (d["width"], d["height"]) for d in dicts}
        raw = _read_user_file(node.FILE, names)
        return {
            n: filter_boxes(np.asarray(b, dtype=np.float64), *sizes[n], node)
            for n, b in raw.items()
        }
    cache = _search_cache(names, node, cache_dir)
    boxes = build_on_main(lambda: _compute_or_read(names, node, cache), "AlignDet selective search")
    counts = [len(b) for b in boxes.values()]
    logger.info(
        "Pseudo-boxes: %d images, %.1f boxes per image on average",
        len(counts),
        float(np.mean(counts)) if counts else 0.0,
    )
    return {n: np.asarray(boxes[n], dtype=np.float64).reshape(-1, 4) for n in names}
