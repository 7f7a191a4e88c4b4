"""Prediction on large images: overlapping tiles, boxes mapped back, duplicates merged.

A detector trained on tiles predicts on an image larger than one tile tile by tile, each tile
at the model's test resize, as the whole image would be. Tiles overlap by ``overlap`` pixels;
the last tile of a row or column is moved back to end at the image border (no padding). An
image no larger than one tile is predicted as it is (exactly the plain prediction).

Merging: a box that reaches an inner tile border (a border that is not the image's) may be a
fragment of an object the tile cuts. Such a box is dropped when a box of the same class that
reaches no inner border of its own tile covers most of it (the neighbouring tile saw the
object whole); then class-wise NMS removes the duplicates of objects seen whole by several
tiles. An object larger than the overlap can be cut in every tile that holds it; its
fragments are kept (merged by NMS only), so choose an overlap at least as large as the
objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

__all__ = ["tile_windows", "overlap_pixels", "merge_tile_predictions", "predict_tiled"]

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels

# A box edge this close (pixels) to an inner tile border is taken as cut by the tile.
BORDER_MARGIN = 2.0
# A cut box is a fragment of a whole box that covers at least this fraction of its area.
FRAGMENT_COVERED = 0.6


def overlap_pixels(tile: int, overlap: float) -> int:
    """Tile overlap in pixels: ``overlap`` < 1 is a fraction of ``tile``, else pixels."""
    pixels = int(round(overlap * tile)) if 0 <= overlap < 1 else int(overlap)
    if overlap < 0 or pixels >= tile:
        raise ValueError(
            f"tile overlap {overlap} ({pixels} px) must be >= 0 and smaller than the tile "
            f"size {tile}"
        )
    return pixels


def _origins(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Tiles covering a ``width`` x ``height`` image, row by row.

    Tiles are ``tile`` pixels square (a side of the image shorter than ``tile`` gives tiles
    of that length) and neighbours overlap by at least ``overlap`` pixels.
    """
    if tile <= 0:
        raise ValueError(f"tile size {tile} must be positive")
    stride = tile - overlap
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in _origins(height, tile, stride)
        for x in _origins(width, tile, stride)
    ]


def _cut_by_tile(boxes: torch.Tensor, window: Window, width: int, height: int) -> torch.Tensor:
    """Whether each box (image pixels) reaches an inner border of ``window``."""
    x0, y0, x1, y1 = window
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + BORDER_MARGIN
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + BORDER_MARGIN
    if x1 < width:
        cut |= boxes[:, 2] >= x1 - BORDER_MARGIN
    if y1 < height:
        cut |= boxes[:, 3] >= y1 - BORDER_MARGIN
    return cut


def _covered(fragments: torch.Tensor, wholes: torch.Tensor) -> torch.Tensor:
    """(F, W): the fraction of each fragment's area inside each whole box."""
    top_left = torch.maximum(fragments[:, None, :2], wholes[None, :, :2])
    bottom_right = torch.minimum(fragments[:, None, 2:], wholes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = (fragments[:, 2:] - fragments[:, :2]).clamp(min=0).prod(dim=1)
    return inter / area.clamp(min=1e-6)[:, None]


def merge_tile_predictions(
    parts: Sequence[tuple[Window, Instances]],
    image_size: tuple[int, int],
    nms_thresh: float = 0.5,
) -> Instances:
    """Merge per-tile predictions into the image's.

    Args:
        parts: (window, Instances with ``pred_boxes``, ``scores``, ``pred_classes`` in the
            window's pixels) per tile.
        image_size: (height, width) of the image.
        nms_thresh: IoU above which the lower-scoring of two same-class boxes is removed.

    Returns:
        Instances in image pixels, sorted by decreasing score.
    """
    height, width = image_size
    boxes, scores, classes, cut, owner = [], [], [], [], []
    for number, (window, inst) in enumerate(parts):
        shift = torch.tensor(window[:2] * 2, dtype=torch.float32)
        tile_boxes = inst.pred_boxes.tensor.float().cpu() + shift
        boxes.append(tile_boxes)
        scores.append(inst.scores.float().cpu())
        classes.append(inst.pred_classes.cpu())
        cut.append(_cut_by_tile(tile_boxes, window, width, height))
        owner.append(torch.full((len(tile_boxes),), number))
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    classes, cut, owner = torch.cat(classes), torch.cat(cut), torch.cat(owner)

    # A whole box covering a fragment overlaps it, so its tile overlaps the fragment's tile:
    # each tile's fragments are compared with the whole boxes of those tiles only (memory
    # and time grow with the tiles, not with the square of all boxes).
    keep = torch.ones(len(boxes), dtype=torch.bool)
    windows = torch.tensor([window for window, _ in parts], dtype=torch.float32)
    for number in owner[cut].unique().tolist():
        x0, y0, x1, y1 = windows[number]
        near = (windows[:, 0] < x1) & (x0 < windows[:, 2]) & (windows[:, 1] < y1)
        near &= y0 < windows[:, 3]
        fragments = (cut & (owner == number)).nonzero()[:, 0]
        wholes = (~cut & near[owner]).nonzero()[:, 0]
        if not len(wholes):
            continue
        same_class = classes[fragments][:, None] == classes[wholes][None, :]
        covered = (_covered(boxes[fragments], boxes[wholes]) >= FRAGMENT_COVERED) & same_class
        keep[fragments[covered.any(dim=1)]] = False
    index = keep.nonzero()[:, 0]
    index = index[batched_nms(boxes[index], scores[index], classes[index], nms_thresh)]
    result = Instances(image_size)
    result.pred_boxes = Boxes(boxes[index])
    result.scores = scores[index]
    result.pred_classes = classes[index]
    return result


def predict_tiled(
    predict: Callable[[np.ndarray], Instances],
    image: np.ndarray,
    tile: int,
    overlap: int,
    nms_thresh: float = 0.5,
    on_tile: Callable[[int, int], None] | None = None,
    predict_batch: Callable[[list[np.ndarray]], list[Instances]] | None = None,
    batch: int = 1,
) -> tuple[Instances, int]:
    """Predict on ``image`` (HWC) tile by tile and merge; return (Instances, tiles used).

    ``predict`` maps an image (HWC, same format) to Instances in its pixels. An image no
    larger than one tile is predicted as it is. ``on_tile(done, total)`` is called after
    each tile (each batch). With ``predict_batch`` (a list of images to their Instances) and
    ``batch`` > 1, the tiles go ``batch`` at a time. ``image`` may be any object with
    ``shape`` whose 2-D slices are arrays (e.g. :class:`~.images.PillowBGR`): only the
    tiles are copied out of it.
    """
    height, width = image.shape[:2]
    windows = tile_windows(width, height, tile, overlap)
    if len(windows) == 1:
        result = predict(np.ascontiguousarray(image[:height, :width]))
        if on_tile is not None:
            on_tile(1, 1)
        return result, 1
    step = batch if predict_batch is not None and batch > 1 else 1
    parts = []
    for start in range(0, len(windows), step):
        chunk = windows[start : start + step]
        tiles = [np.ascontiguousarray(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in chunk]
        found = predict_batch(tiles) if step > 1 else [predict(tiles[0])]
        parts += zip(chunk, found)
        if on_tile is not None:
            on_tile(len(parts), len(windows))
    return merge_tile_predictions(parts, (height, width), nms_thresh), len(windows)
