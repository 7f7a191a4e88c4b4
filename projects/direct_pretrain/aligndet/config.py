"""The ``ALIGNDET`` config node: box-domain pre-training (Li et al., ICCV 2023)."""

from __future__ import annotations

from typing import Callable

from detectron2.config import CfgNode as CN

__all__ = ["add_aligndet_config"]


def add_aligndet_config(cfg: CN, new_phase_node: Callable[..., CN]) -> None:
    """Add the ``DIRECT_PRETRAIN.BOX_DOMAIN`` phase node (made by ``new_phase_node``) and
    ``ALIGNDET``: pseudo-boxes, the two views and the box-domain losses."""
    # Box-domain pre-training: by default only the backbone body comes from the previous
    # (image-domain) phase and stays frozen; FPN, RPN and heads learn from pseudo-boxes. With
    # INIT "weights", MODEL.WEIGHTS may be a torchvision- or MoCo-style ResNet checkpoint.
    cfg.DIRECT_PRETRAIN.BOX_DOMAIN = new_phase_node(
        INIT="previous",
        INIT_KEYS=r"^backbone\.bottom_up\.",
        BACKBONE_NORM="FrozenBN",
        IMS_PER_BATCH=16,
        BASE_LR=0.02,
        WARMUP_ITERS=500,
    )
    cfg.ALIGNDET = CN()
    node = cfg.ALIGNDET

    node.PROPOSALS = CN()
    # Pseudo-boxes: "" computes selective-search proposals once and caches them with the
    # dataset; or a JSON file {image file_name: [[x0, y0, x1, y1], ...]} of your own.
    node.PROPOSALS.FILE = ""
    # SoCo's "ratio3size0008" filter, as AlignDet uses it: both sides >= MIN_SIDE pixels,
    # aspect ratio <= MAX_ASPECT_RATIO, MIN_RELATIVE_SIZE <= sqrt(box area / image area) <=
    # MAX_RELATIVE_SIZE (ratio3 -> 3, size0008 -> 0.0 and 0.8).
    node.PROPOSALS.MIN_SIDE = 32.0
    node.PROPOSALS.MAX_ASPECT_RATIO = 3.0
    node.PROPOSALS.MIN_RELATIVE_SIZE = 0.0
    node.PROPOSALS.MAX_RELATIVE_SIZE = 0.8
    # Non-maximum suppression among the surviving boxes (earlier boxes rank higher; our reading
    # of the "@0.5" of the public proposal file's name); 1.0 disables it.
    node.PROPOSALS.NMS_THRESH = 0.5
    # Pseudo-boxes used per image, first in the proposals' order: -1 is the public code's
    # choice (all for the R-CNNs and FCOS, the first 50 for RetinaNet).
    node.PROPOSALS.MAX_PER_IMAGE = -1
    # OpenCV selective search: "single" (one HSV strategy with SEARCH_K and SEARCH_SIGMA, the
    # closest to SoCo's Python implementation), "fast" or "quality" (OpenCV's presets).
    node.PROPOSALS.SEARCH_MODE = "single"
    # Felzenszwalb segmentation scale and smoothing of the single strategy (SoCo: 300, 0.9).
    node.PROPOSALS.SEARCH_K = 300
    node.PROPOSALS.SEARCH_SIGMA = 0.9
    # Run the search on the image downscaled to this longer side (0: full resolution, SoCo).
    node.PROPOSALS.SEARCH_MAX_SIDE = 0
    # Processes computing proposals (0: one per CPU core).
    node.PROPOSALS.NUM_WORKERS = 0

    node.VIEW = CN()
    # Each view: short side sampled from MIN_SIZE_TRAIN (long side capped), flip, one random
    # photometric operation of the public code (magnitude 1-9 of 10); the two views are
    # augmented independently.
    node.VIEW.MIN_SIZE_TRAIN = (640, 672, 704, 736, 768, 800)
    node.VIEW.MAX_SIZE_TRAIN = 1333
    node.VIEW.PHOTOMETRIC = True
    # Pseudo-boxes not wider and taller than this (pixels) in either view are dropped from
    # both (the public code: 0.01).
    node.VIEW.MIN_BOX_SIZE = 0.01

    # Dimension of the contrastive embedding (the classifier becomes an fc-ReLU-fc MLP).
    node.EMBED_DIM = 256
    # Temperature of the box-level contrastive loss.
    node.TEMPERATURE = 0.5
    # EMA momentum of the target detector at the start; it rises to 1 on a cosine schedule.
    node.MOMENTUM = 0.996
    # R-CNN: positive RoIs (IoU >= 0.5 with a pseudo-box, pseudo-boxes included) sampled per
    # image in each view; no negative RoIs.
    node.POSITIVES_PER_IMAGE = 4096
    # R-CNN: RPN anchors sampled per image and their positive fraction (1.0: all positives,
    # negatives fill the rest).
    node.RPN_BATCH_SIZE_PER_IMAGE = 4096
    node.RPN_POSITIVE_FRACTION = 1.0
    # RetinaNet: anchors sampled per image in each view, positives first, background fills
    # the rest (background anchors are negatives of every instance).
    node.RETINANET_SAMPLES_PER_IMAGE = 2048
    # FCOS: points sampled in each view over the whole per-process batch, positives first,
    # background fills the rest (the public code: 2048 for 2 images per GPU).
    node.FCOS_SAMPLES_PER_BATCH = 2048
    # FCOS: centre-sampling radius of the box-domain assignment (0: every point inside a
    # pseudo-box, as the public FCOS head; the fine-tuned FCOS keeps MODEL.FCOS's).
    node.FCOS_CENTER_SAMPLING_RADIUS = 0.0
    node.CONTRAST_WEIGHT = 1.0
    node.REG_WEIGHT = 1.0
    # Transfer: keep the box-domain prediction layers (regression, centerness) in the
    # fine-tuned model instead of re-initialising them.
    node.KEEP_PREDICTORS = False
