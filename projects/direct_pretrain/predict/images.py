"""Predict on a list of image files: inputs expanded, unreadable files skipped, progress logged."""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import numpy as np
from detectron2.structures import Instances
from PIL import Image

from ..data.images import BadImageError, open_image_checked
from .tiling import predict_tiled
from .writers import PredictionWriter

__all__ = ["IMAGE_EXTENSIONS", "PillowBGR", "list_images", "predict_images"]

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


class PillowBGR:
    """An RGB Pillow image seen as a BGR HWC array: ``shape``, and 2-D slices (``[y0:y1,
    x0:x1]``) that copy only that window, so a large image is cut into tiles without a
    second full-size array."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.shape = (image.height, image.width, 3)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        return np.asarray(self.image.crop((x0, y0, x1, y1)))[:, :, ::-1]


def predict_images(
    predict: Callable,
    files: Sequence[str],
    writer: PredictionWriter,
    tile: int,
    overlap: int,
    nms_thresh: float = 0.5,
    score_thresh: float = 0.5,
    batch: int = 1,
) -> dict:
    """Predict on every file not yet done in the writer's output (tiled when larger than
    ``tile``; ``tile`` 0: whole images) and write each image's outputs as it finishes.
    Unreadable files are logged by name, skipped and counted.

    Args:
        predict: BGR image (HWC) -> the model's output dict (``DefaultPredictor``'s
            interface); with ``batch`` > 1 it needs ``predict.predict_batch`` (a list of
            images -> their output dicts, as :class:`~direct_pretrain.predictor.Predictor`).
        files: image files.
        writer: writes the outputs; the files it holds already are skipped.
        tile, overlap: tile size and overlap in pixels.
        nms_thresh: IoU of the merge's class-wise NMS across tiles.
        score_thresh: detections below this score are not written.
        batch: tiles of one image per forward pass.

    Returns:
        A summary: images, tiles and detections in the output, images already done before,
        skipped files, and this run's seconds and speeds.
    """

    def predict_instances(image) -> Instances:
        return predict(image)["instances"].to("cpu")

    def predict_batch(images: list) -> list[Instances]:
        return [out["instances"].to("cpu") for out in predict.predict_batch(images)]

    if batch > 1 and not hasattr(predict, "predict_batch"):
        raise ValueError(f"{type(predict).__name__} takes one image per call: use batch 1")

    done = writer.done
    todo = [f for f in files if f not in done]
    if len(todo) < len(files):
        logger.info(
            "%d of %d images already done in %s, predicting the other %d",
            len(files) - len(todo),
            len(files),
            writer.output_dir,
            len(todo),
        )
    progress = _Progress(len(todo))
    skipped: list[str] = []
    tiles = 0
    start = time.perf_counter()
    for index, path in enumerate(todo):
        try:
            image = open_image_checked(path, "RGB")
        except BadImageError as e:
            logger.warning("Skipping '%s': %s", path, e)
            skipped.append(path)
            continue

        def on_tile(done: int, total: int, index: int = index) -> None:
            if total > 1:
                progress.update(index + done / total, f" (image {index + 1}: tile {done}/{total})")

        source = PillowBGR(image)
        if tile > 0:
            instances, used = predict_tiled(
                predict_instances, source, tile, overlap, nms_thresh, on_tile, predict_batch, batch
            )
        else:
            instances, used = predict_instances(source[:, :]), 1
        instances = instances[instances.scores >= score_thresh]
        writer.add(path, image, instances, used)
        del image, source
        tiles += used
        progress.update(index + 1, final=index + 1 == len(todo))
    writer.close()
    seconds = time.perf_counter() - start
    predicted = len(todo) - len(skipped)
    summary = {
        "images": len(writer.records),
        "tiles": sum(r["tiles"] for r in writer.records),
        "detections": sum(len(r["detections"]) for r in writer.records),
        "already_done": len(files) - len(todo),
        "predicted": predicted,
        "skipped": skipped,
        "seconds": round(seconds, 2),
        "images_per_second": round(predicted / seconds, 3) if seconds > 0 else None,
        "tiles_per_second": round(tiles / seconds, 3) if seconds > 0 else None,
    }
    logger.info(
        "Predicted %d image(s) (%d tiles) in %.1f s: %s images/s, %s tiles/s; the output holds "
        "%d image(s), %d detections. Skipped %d unreadable file(s)%s",
        predicted,
        tiles,
        seconds,
        summary["images_per_second"],
        summary["tiles_per_second"],
        summary["images"],
        summary["detections"],
        len(skipped),
        (": " + ", ".join(skipped)) if skipped else ".",
    )
    return summary
