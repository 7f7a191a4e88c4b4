"""The first batches of a phase's training loader, drawn as the model receives them.

The batches come from :meth:`DirectPretrainTrainer.build_train_loader` (the phase's resize,
crop and flip, as in training and PreciseBN), on CPU in the calling process (no loader
workers). Each batch is padded as the model pads it (to the backbone's size divisibility, with
zeros after normalisation: the pixel mean), and drawn with its ground-truth boxes and class
names, one tile per image. AlignDet's box-domain loader yields two views of each image: both
are drawn, with their pseudo-boxes (which have no class). Python, NumPy and torch random states
are left as they were, so drawing does not change the training that follows.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.modeling import build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from .config_systems import YacsSystem
from .engine import DirectPretrainTrainer
from .utils.rng import rng_kept

__all__ = ["draw_batches", "first_batches", "model_images"]

logger = logging.getLogger(__name__)

DRAW_SIZE = 256  # tiles are drawn at least this large (longer side), by a whole factor
COLUMNS = 4  # tiles per row of the grid
GAP = 4  # pixels between tiles
BOX_COLOR = (0, 0.8, 0)


def _model_inputs(item: dict) -> list[dict]:
    """The model inputs of one loader item: itself, or its views (AlignDet: view1, view2)."""
    if "image" in item:
        return [item]
    return [item[k] for k in sorted(item) if isinstance(item[k], dict) and "image" in item[k]]


def first_batches(pcfg: CfgNode, num_batches: int = 1) -> list[list[dict]]:
    """The first ``num_batches`` batches of the phase's training loader, each a list of model
    inputs (``image``: CHW uint8 tensor in ``INPUT.FORMAT``, ``instances``: gt_boxes,
    gt_classes).

    Call it on every process: building the loader is collective (the sampler's shared seed, the
    low-resolution cache). Only the main process takes batches (the others get ``[]``): with
    several processes, its share of each batch.
    """
    cfg = pcfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    with rng_kept():
        loader = DirectPretrainTrainer.build_train_loader(cfg, start_iter=0)
        if not comm.is_main_process():
            return []
        batches = itertools.islice(loader, num_batches)
        return [[x for item in batch for x in _model_inputs(item)] for batch in batches]


def model_images(
    batch: list[dict], size_divisibility: int, pixel_mean: list[float]
) -> torch.Tensor:
    """The batch's images as one NCHW uint8 tensor, padded as the model pads them."""
    mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
    images = [x["image"].float() - mean for x in batch]
    padded = ImageList.from_tensors(images, size_divisibility).tensor + mean
    return padded.round().clamp(0, 255).to(torch.uint8)


def _tile(
    rgb: np.ndarray, instances: Instances, scale: int, classes: list[str] | None
) -> np.ndarray:
    """One image scaled ``scale`` times with its boxes (named by ``classes`` if given)."""
    boxes = instances.gt_boxes.tensor.numpy()
    labels = None if classes is None else [classes[c] for c in instances.gt_classes.tolist()]
    vis = Visualizer(np.ascontiguousarray(rgb), scale=scale)
    drawn = vis.overlay_instances(
        boxes=boxes, labels=labels, assigned_colors=[BOX_COLOR] * len(boxes)
    )
    return drawn.get_image()


def draw_batches(pcfg, path: str | Path, num_batches: int = 1) -> Path | None:
    """Draw the phase's first ``num_batches`` training batches into the JPEG ``path``.

    A grid of ``COLUMNS`` tiles per row, one tile per image in loader order, each scaled by the
    same whole factor (to at least ``DRAW_SIZE`` px), boxes in green with their class names.
    Call it on every process (see :func:`first_batches`); the main process writes the file and
    returns its path, the others return None. LazyConfig phase configs are skipped (None).
    """
    if not isinstance(pcfg, CfgNode):
        logger.info("Batch images are drawn for yacs configs only; skipping.")
        return None
    batches = first_batches(pcfg, num_batches)
    if not batches:
        return None
    size_divisibility = build_backbone(pcfg).size_divisibility
    padded = [model_images(b, size_divisibility, pcfg.MODEL.PIXEL_MEAN) for b in batches]
    inputs = [x for b in batches for x in b]
    images = [image for batch in padded for image in batch]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    scale = max(1, DRAW_SIZE // max(height, width))
    classes = MetadataCatalog.get(pcfg.DATASETS.TRAIN[0]).get("thing_classes", [])
    named = YacsSystem().phase(pcfg).KIND.evaluates  # else class-less pseudo-boxes
    columns = min(COLUMNS, len(images))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = width * scale + GAP, height * scale + GAP
    grid = Image.new("RGB", (columns * cell_w - GAP, rows * cell_h - GAP), "white")
    for i, (x, image) in enumerate(zip(inputs, images)):
        rgb = convert_image_to_rgb(image.permute(1, 2, 0).numpy(), pcfg.INPUT.FORMAT)
        tile = _tile(rgb, x["instances"], scale, classes if named else None)
        grid.paste(Image.fromarray(tile), ((i % columns) * cell_w, i // columns * cell_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, quality=90)
    logger.info(
        "Phase %s: its first %d training batch(es) as the model receives them: %s",
        pcfg.DIRECT_PRETRAIN.PHASE,
        len(batches),
        path,
    )
    return path
