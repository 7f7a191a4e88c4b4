"""A cached low-resolution copy of a training set, for phases that only train on small crops.

Decoding a full-size image only to shrink it wastes most of a low-resolution loader's time. For
a ``fixed_size_crop`` phase, each image is stored once at the largest size its augmentation can
produce (SCALE x the top of RATIO_RANGE), so training reads fewer pixels while every training
image is the same as from the original, up to interpolation: ResizeScale's output size only
depends on the target size, not on the size of its input.

Images are read with :func:`~.images.read_image_checked` and checked against the dataset's
width/height (an EXIF-rotated image is an error, never squashed into the dataset's size). With
``skip_bad`` (``DIRECT_PRETRAIN.BAD_IMAGES: skip``) bad images are left out of the cached
training set and named in a warning; otherwise they are named in a
:class:`~.images.BadImageError`. Either way the cache is completed and lists them in its
``COMPLETE.json``, so a rerun with ``skip`` reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2

from ..utils.io import atomic_write_json, file_signature
from .images import BAD_IMAGES_HINT, BadImageError, check_image_size, read_image_checked

__all__ = ["copy_scale", "maybe_resized", "resized_dicts"]

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: 16-bit, palette and EXIF-rotated images read correctly
_MAX_NAMES = 10


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


def _write_copy(args) -> str | None:
    """Write one downscaled copy; return the error naming a bad source image, else None."""
    source, target, source_size, size = args
    try:
        image = read_image_checked(source, "BGR")
        check_image_size(source, image, *source_size)
    except BadImageError as e:  # returned: the parent decides to skip or stop, for all at once
        return str(e)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if not cv2.imwrite(target, small, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write the low-resolution copy '{target}' of '{source}'")
    return None


def _key(dicts: list[dict], max_height: float, max_width: float) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} {max_height} {max_width}".encode())
    for d in dicts:
        signature = file_signature(d["file_name"])
        digest.update(f"{d['file_name']}|{signature}|{d['width']}|{d['height']}".encode())
    return digest.hexdigest()[:16]


def resized_dicts(
    dicts: list[dict],
    max_height: float,
    max_width: float,
    cache_dir: Path,
    skip_bad: bool = False,
    workers: int = 0,
) -> list[dict]:
    """``dicts`` with images stored downscaled to fit ``max_height`` x ``max_width``.

    Images already small enough are used as they are (the loader checks them). The copy is
    built once (in parallel), keyed by the source files (path, size, modification time, the
    dataset's width/height) and the size, and rebuilt when either changes; an interrupted or
    failed build is never used.

    Raises:
        BadImageError: without ``skip_bad``, naming the bad images of the set.
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
        jobs.append((d["file_name"], name, (d["width"], d["height"]), (width, height)))
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
    if not jobs:
        return out
    complete = folder / "COMPLETE.json"
    if not complete.is_file():
        _build(folder, jobs, workers)
    bad = json.loads(complete.read_text())["bad_images"]
    if not bad:
        return out
    _report_bad(bad, skip_bad, complete)
    bad_targets = {str(folder / name) for source, name, *_ in jobs if source in bad}
    return [d for d in out if d["file_name"] not in bad_targets]


def _report_bad(bad: dict[str, str], skip_bad: bool, listed_in: Path) -> None:
    """Warn about (skip) or raise for (stop) the bad images ``{file: error}``."""
    errors = [bad[name] for name in sorted(bad)]
    more = f"; and {len(errors) - _MAX_NAMES} more" if len(errors) > _MAX_NAMES else ""
    listing = "; ".join(errors[:_MAX_NAMES]) + more
    if not skip_bad:
        raise BadImageError(
            f"low-resolution cache: {len(errors)} bad training image(s) (listed in "
            f"{listed_in}): {listing}. {BAD_IMAGES_HINT}."
        )
    logger.warning(
        "Low-resolution cache: %d bad training image(s) left out of the training set (listed "
        "in %s): %s",
        len(errors),
        listed_in,
        listing,
    )


def _build(folder: Path, jobs: list[tuple], workers: int) -> None:
    """Write the copies into ``folder``, with the bad images ``{file: error}`` in its
    ``COMPLETE.json`` (kept with either BAD_IMAGES setting, so a rerun with skip reuses it)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    logger.info("Caching %d training images at low resolution in %s (once)", len(jobs), folder)
    try:
        work = [(src, str(tmp / name), src_size, size) for src, name, src_size, size in jobs]
        workers = workers or os.cpu_count() or 1
        if workers == 1:
            errors = [_write_copy(job) for job in work]
        else:
            with ProcessPoolExecutor(workers) as pool:
                errors = list(pool.map(_write_copy, work, chunksize=16))
        bad = {job[0]: error for job, error in zip(jobs, errors) if error is not None}
        atomic_write_json(
            tmp / "COMPLETE.json", {"images": len(jobs) - len(bad), "bad_images": bad}
        )
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


def maybe_resized(
    dicts: list[dict], node, cache_dir: Path, skip_bad: bool = False, workers: int = 0
) -> list[dict]:
    """The phase's training dicts, from the low-resolution cache when the phase uses one.

    ``node`` is the phase node: a ``fixed_size_crop`` phase with ``RESIZED_CACHE`` reads copies
    that fit SCALE x the top of RATIO_RANGE. ``skip_bad``: leave bad images out (with a
    warning naming them) instead of raising.
    """
    if node.AUGMENTATION != "fixed_size_crop" or not node.RESIZED_CACHE:
        return dicts
    top = max(node.RATIO_RANGE)
    return resized_dicts(
        dicts, node.SCALE[0] * top, node.SCALE[1] * top, cache_dir, skip_bad, workers
    )
