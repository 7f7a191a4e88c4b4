"""Predict on a list of image files: inputs expanded, unreadable files skipped, progress logged."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from detectron2.structures import Instances

from ..data.images import BadImageError, read_image_checked
from .tiling import predict_tiled
from .writers import PredictionWriter

__all__ = ["IMAGE_EXTENSIONS", "list_images", "predict_images"]

logger = logging.getLogger(__name__)

# Files taken from folders and glob patterns (a file named explicitly is always tried).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
LOG_SECONDS = 10.0  # at most one progress line per this many seconds


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image files from files, folders (their images, not recursive) and glob patterns
    (``**`` recurses), in order and without repeats.

    Raises:
        FileNotFoundError: naming an input that is no file or folder and matches nothing.
    """
    files: list[str] = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isfile(path):
            found = [path]
        elif os.path.isdir(path):
            found = sorted(
                p for p in (os.path.join(path, n) for n in os.listdir(path)) if _is_image(p)
            )
        else:
            found = sorted(p for p in glob.glob(path, recursive=True) if _is_image(p))
            if not found:
                raise FileNotFoundError(f"input '{item}' is no file or folder and matches no image")
        files += found
    unique = list(dict.fromkeys(files))
    if not unique:
        raise FileNotFoundError(f"no image found in the inputs {list(inputs)}")
    return unique


class _Progress:
    """Logs the count and the time left, at most every LOG_SECONDS."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.last_log = self.start

    def update(self, done: float, detail: str = "", final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last_log < LOG_SECONDS:
            return
        self.last_log = now
        eta = (now - self.start) / max(done, 1e-9) * (self.total - done)
        logger.info(
            "Predicted %d/%d images%s, ETA %s",
            int(done),
            self.total,
            detail,
            timedelta(seconds=round(eta)),
        )


def predict_images(
    predict: Callable,
    files: Sequence[str],
    writer: PredictionWriter,
    tile: int,
    overlap: int,
    nms_thresh: float = 0.5,
    score_thresh: float = 0.5,
) -> dict:
    """Predict on every file (tiled when larger than ``tile``; ``tile`` 0: whole images) and
    write the outputs. Unreadable files are logged by name, skipped and counted.

    Args:
        predict: BGR image (HWC) -> the model's output dict (``DefaultPredictor``'s interface).
        files: image files.
        writer: collects and writes the outputs.
        tile, overlap: tile size and overlap in pixels.
        nms_thresh: IoU of the merge's class-wise NMS across tiles.
        score_thresh: detections below this score are not written.

    Returns:
        A summary: images, tiles, detections, skipped files, seconds and speeds.
    """

    def predict_instances(image) -> Instances:
        return predict(image)["instances"].to("cpu")

    progress = _Progress(len(files))
    skipped: list[str] = []
    tiles = detections = 0
    start = time.perf_counter()
    for index, path in enumerate(files):
        try:
            image = read_image_checked(path, "BGR")
        except BadImageError as e:
            logger.warning("Skipping '%s': %s", path, e)
            skipped.append(path)
            continue

        def on_tile(done: int, total: int, index: int = index) -> None:
            if total > 1:
                progress.update(index + done / total, f" (image {index + 1}: tile {done}/{total})")

        if tile > 0:
            instances, used = predict_tiled(
                predict_instances, image, tile, overlap, nms_thresh, on_tile
            )
        else:
            instances, used = predict_instances(image), 1
        instances = instances[instances.scores >= score_thresh]
        writer.add(path, image[:, :, ::-1], instances)
        tiles += used
        detections += len(instances)
        progress.update(index + 1, final=index + 1 == len(files))
    writer.close()
    seconds = time.perf_counter() - start
    images = len(files) - len(skipped)
    summary = {
        "images": images,
        "tiles": tiles,
        "detections": detections,
        "skipped": skipped,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 3) if seconds > 0 else None,
        "tiles_per_second": round(tiles / seconds, 3) if seconds > 0 else None,
    }
    logger.info(
        "Predicted %d image(s) (%d tiles, %d detections) in %.1f s: %s images/s, %s tiles/s. "
        "Skipped %d unreadable file(s)%s",
        images,
        tiles,
        detections,
        seconds,
        summary["images_per_second"],
        summary["tiles_per_second"],
        len(skipped),
        (": " + ", ".join(skipped)) if skipped else ".",
    )
    return summary
