"""A cached low-resolution copy of a training set, for phases that only train on small crops.

Decoding a full-size image only to shrink it wastes most of a low-resolution loader's time. For
a ``fixed_size_crop`` phase, each image is stored once at the largest size its augmentation can
produce (SCALE x the top of RATIO_RANGE), so training reads fewer pixels while every training
image is the same as from the original, up to interpolation: ResizeScale's output size only
depends on the target size, not on the size of its input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
from detectron2.data.detection_utils import read_image

from ..utils.io import atomic_write_json

__all__ = ["copy_scale", "maybe_resized", "resized_dicts"]

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def copy_scale(height: int, width: int, max_height: float, max_width: float) -> float:
    """Scale (<= 1) of the stored copy: the largest resize the augmentation can ask for."""
    return min(1.0, max_height / height, max_width / width)


def _scale_annotation(ann: dict, scale: float) -> dict:
    ann = dict(ann)
    ann["bbox"] = [v * scale for v in ann["bbox"]]  # XYXY or XYWH, absolute: both scale
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        ann["segmentation"] = [[v * scale for v in poly] for poly in segmentation]
    elif segmentation is not None:  # RLE masks cannot be rescaled here
        ann.pop("segmentation")
    if "keypoints" in ann:
        ann["keypoints"] = [v * scale if i % 3 != 2 else v for i, v in enumerate(ann["keypoints"])]
    return ann


def _write_copy(args) -> None:
    source, target, height, width = args
    image = read_image(source, format="BGR")
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    cv2.imwrite(target, small, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def _key(dicts: list[dict], max_height: float, max_width: float) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} {max_height} {max_width}".encode())
    for d in dicts:
        stat = os.stat(d["file_name"])
        digest.update(f"{d['file_name']}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def resized_dicts(
    dicts: list[dict], max_height: float, max_width: float, cache_dir: Path, workers: int = 0
) -> list[dict]:
    """``dicts`` with images stored downscaled to fit ``max_height`` x ``max_width``.

    Images already small enough are used as they are. The copy is built once (in parallel),
    keyed by the source files (path, size, modification time) and the size, and rebuilt when
    either changes; an interrupted build is never used.
    """
    folder = cache_dir / "resized" / _key(dicts, max_height, max_width)
    out, jobs = [], []
    for index, d in enumerate(dicts):
        scale = copy_scale(d["height"], d["width"], max_height, max_width)
        if scale >= 1.0:
            out.append(d)
            continue
        height, width = round(d["height"] * scale), round(d["width"] * scale)
        name = f"{index:07d}_{Path(d['file_name']).stem}.png"
        jobs.append((d["file_name"], name, height, width))
        out.append(
            {
                **d,
                "file_name": str(folder / name),
                "height": height,
                "width": width,
                "annotations": [
                    _scale_annotation(a, width / d["width"]) for a in d.get("annotations", [])
                ],
            }
        )
    if jobs and not (folder / "COMPLETE.json").is_file():
        _build(folder, jobs, workers)
    return out


def _build(folder: Path, jobs: list[tuple], workers: int) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    logger.info("Caching %d training images at low resolution in %s (once)", len(jobs), folder)
    try:
        work = [(src, str(tmp / name), h, w) for src, name, h, w in jobs]
        workers = workers or os.cpu_count() or 1
        if workers == 1:
            for job in work:
                _write_copy(job)
        else:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_copy, work, chunksize=16))
        atomic_write_json(tmp / "COMPLETE.json", {"images": len(jobs)})
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "COMPLETE.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Low-resolution cache: %.1f MB", sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    )


def maybe_resized(dicts: list[dict], node, cache_dir: Path, workers: int = 0) -> list[dict]:
    """The phase's training dicts, from the low-resolution cache when the phase uses one.

    ``node`` is the phase node: a ``fixed_size_crop`` phase with ``RESIZED_CACHE`` reads copies
    that fit SCALE x the top of RATIO_RANGE.
    """
    if node.AUGMENTATION != "fixed_size_crop" or not node.RESIZED_CACHE:
        return dicts
    top = max(node.RATIO_RANGE)
    return resized_dicts(dicts, node.SCALE[0] * top, node.SCALE[1] * top, cache_dir, workers)
