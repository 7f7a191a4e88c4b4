"""The ``ALIGNDET`` config node: box-domain pre-training (Li et al., ICCV 2023)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_aligndet_config"]


def add_aligndet_config(cfg: CN) -> None:
    """Add ``ALIGNDET``: pseudo-boxes, the two views and the box-domain losses."""
    cfg.ALIGNDET = CN()
    node = cfg.ALIGNDET

    node.PROPOSALS = CN()
    # Pseudo-boxes: "" computes selective-search proposals once and caches them with the
    # dataset; or a JSON file {image file_name: [[x0, y0, x1, y1], ...]} of your own.
    node.PROPOSALS.FILE = ""
    # Pseudo-boxes kept per image (in the source's order, after filtering and NMS).
    node.PROPOSALS.MAX_PER_IMAGE = 100
    # Boxes longer than this ratio in either direction are dropped.
    node.PROPOSALS.MAX_ASPECT_RATIO = 3.0
    # Boxes whose shorter side is below this fraction of the image's longer side are dropped
    # (our reading of the public code's "min size 0.008").
    node.PROPOSALS.MIN_RELATIVE_SIZE = 0.008
    # Non-maximum suppression among proposals (earlier selective-search boxes rank higher).
    node.PROPOSALS.NMS_THRESH = 0.5
    # Selective search runs on the image downscaled to this longer side (speed).
    node.PROPOSALS.SEARCH_MAX_SIDE = 512
    # Processes computing proposals (0: one per CPU core).
    node.PROPOSALS.NUM_WORKERS = 0

    node.VIEW = CN()
    # Each view: short side sampled from MIN_SIZE_TRAIN (long side capped), flip, one random
    # photometric operation; the two views are augmented independently.
    node.VIEW.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
    node.VIEW.MAX_SIZE_TRAIN = 1333
    node.VIEW.PHOTOMETRIC = True
    # Pseudo-boxes smaller than this (pixels, either side) in either view are dropped.
    node.VIEW.MIN_BOX_SIZE = 8.0

    # Dimension of the contrastive embedding (the classifier becomes an fc-ReLU-fc MLP).
    node.EMBED_DIM = 256
    # Temperature of the InfoNCE loss.
    node.TEMPERATURE = 0.5
    # EMA momentum of the target detector at the start; it rises to 1 on a cosine schedule.
    node.MOMENTUM = 0.996
    # Positive RoIs (IoU >= 0.5 with a pseudo-box) sampled per image; negatives are not used.
    node.POSITIVES_PER_IMAGE = 4096
    # RPN anchors sampled per image and their positive fraction during box-domain training
    # (1.0: all positives, negatives fill the rest).
    node.RPN_BATCH_SIZE_PER_IMAGE = 4096
    node.RPN_POSITIVE_FRACTION = 1.0
    # One-stage detectors: positive anchors/points sampled per image for the contrastive loss.
    node.DENSE_POSITIVES_PER_IMAGE = 1024
    node.CONTRAST_WEIGHT = 1.0
    node.REG_WEIGHT = 1.0
    # Transfer: keep the box-domain prediction layers (projection, regression, centerness)
    # in the fine-tuned model instead of re-initialising them.
    node.KEEP_PREDICTORS = False
