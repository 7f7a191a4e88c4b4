"""Per-channel pixel mean/std of a training set, for data unlike ImageNet (cached)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..utils.io import atomic_write_json, file_signature
from .images import BAD_IMAGES_HINT, BadImageError, read_image_checked

__all__ = ["dataset_pixel_stats"]

logger = logging.getLogger(__name__)
STATS_VERSION = 2  # 2: 16-bit and palette images read correctly; bad images skipped


def dataset_pixel_stats(
    file_names: list[str],
    image_format: str,
    max_images: int,
    cache_dir: Path,
    skip_bad: bool = False,
) -> tuple[list[float], list[float]]:
    """Mean and std of each channel (in ``image_format`` order) over up to ``max_images``.

    Images are sampled evenly over the sorted file list, so the result is deterministic. It is
    cached in ``cache_dir`` under a key of the sampled files (names, sizes, modification
    times) and the format, with the
    names of the bad images left out.

    Args:
        skip_bad: leave unreadable images out, each named in a warning (``BAD_IMAGES: skip``);
            otherwise the first one is a :class:`~.images.BadImageError` naming it.

    Raises:
        BadImageError: a bad image without ``skip_bad``, or every sampled image bad.
    """
    names = sorted(file_names)
    if not names:
        raise ValueError("cannot compute pixel statistics of an empty training set")
    step = max(1, len(names) // max_images)
    sample = names[::step][:max_images]
    signatures = [file_signature(name) for name in sample]
    payload = json.dumps([STATS_VERSION, image_format, sample, signatures]).encode()
    key = hashlib.sha256(payload).hexdigest()[:16]
    cache = cache_dir / "pixel_stats" / f"{key}.json"
    if cache.is_file():
        stats = json.loads(cache.read_text())
        if stats["bad_images"] and not skip_bad:  # computed by an earlier run with skip
            bad = stats["bad_images"]
            raise BadImageError(
                f"pixel statistics: {len(bad)} bad image(s), first {', '.join(bad[:10])} "
                f"(listed in {cache}). {BAD_IMAGES_HINT}."
            )
        return stats["mean"], stats["std"]

    total, total_sq, count, bad = 0.0, 0.0, 0, []
    for name in sample:
        try:
            image = read_image_checked(name, image_format)
        except BadImageError as e:
            if not skip_bad:
                raise type(e)(f"pixel statistics: {e}. {BAD_IMAGES_HINT}.") from e
            bad.append(name)
            logger.warning("Pixel statistics: skipping bad image (%s)", e)
            continue
        pixels = image.reshape(-1, image.shape[2]).astype(np.float64)
        total = total + pixels.sum(0)
        total_sq = total_sq + (pixels**2).sum(0)
        count += pixels.shape[0]
    if not count:
        raise BadImageError(
            f"pixel statistics: all {len(sample)} sampled training images are bad (first: "
            f"{sample[0]}); is the image folder right?"
        )
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    stats = {
        "mean": mean.round(3).tolist(),
        "std": std.round(3).tolist(),
        "images": len(sample) - len(bad),
        "format": image_format,
        "bad_images": bad,
    }
    atomic_write_json(cache, stats)
    logger.info(
        "Pixel statistics of %d training images (%d bad ones skipped): mean %s std %s",
        stats["images"],
        len(bad),
        stats["mean"],
        stats["std"],
    )
    return stats["mean"], stats["std"]
