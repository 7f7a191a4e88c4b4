"""Per-channel pixel mean/std of a training set, for data unlike ImageNet (cached)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from detectron2.data.detection_utils import read_image

from ..utils.io import atomic_write_json

__all__ = ["dataset_pixel_stats"]

logger = logging.getLogger(__name__)


def dataset_pixel_stats(
    file_names: list[str], image_format: str, max_images: int, cache_dir: Path
) -> tuple[list[float], list[float]]:
    """Mean and std of each channel (in ``image_format`` order) over up to ``max_images``.

    Images are sampled evenly over the sorted file list, so the result is deterministic. It is
    cached in ``cache_dir`` under a key of the sampled file names and the format.
    """
    names = sorted(file_names)
    if not names:
        raise ValueError("cannot compute pixel statistics of an empty training set")
    step = max(1, len(names) // max_images)
    sample = names[::step][:max_images]
    key = hashlib.sha256(json.dumps([image_format, sample]).encode()).hexdigest()[:16]
    cache = cache_dir / "pixel_stats" / f"{key}.json"
    if cache.is_file():
        stats = json.loads(cache.read_text())
        return stats["mean"], stats["std"]

    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for name in sample:
        image = read_image(name, format=image_format).reshape(-1, 3).astype(np.float64)
        total += image.sum(0)
        total_sq += (image**2).sum(0)
        count += image.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    stats = {
        "mean": mean.round(3).tolist(),
        "std": std.round(3).tolist(),
        "images": len(sample),
        "format": image_format,
    }
    atomic_write_json(cache, stats)
    logger.info(
        "Pixel statistics of %d training images: mean %s std %s",
        len(sample),
        stats["mean"],
        stats["std"],
    )
    return stats["mean"], stats["std"]
