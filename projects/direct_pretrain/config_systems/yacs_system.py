"""The yacs config system: a :class:`~direct_pretrain.phases.Phase` written into Detectron2 keys."""

from __future__ import annotations

import logging
import os

import yaml
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader

from ..config import lookup
from ..modeling import build_logged_model
from ..phases import Phase
from ..utils.env import check_cpp_requirements
from ..utils.io import atomic_write_text, flatten_dict
from .base import ConfigSystem

__all__ = ["PHASE_CONTROLLED_KEYS", "YacsSystem", "phase_config", "training_dicts"]

logger = logging.getLogger(__name__)

# Phase keys copied as they are into Detectron2 keys.
_DIRECT_KEYS = {
    "MIN_SIZE_TRAIN": "INPUT.MIN_SIZE_TRAIN",
    "MAX_SIZE_TRAIN": "INPUT.MAX_SIZE_TRAIN",
    "MIN_SIZE_TEST": "INPUT.MIN_SIZE_TEST",
    "MAX_SIZE_TEST": "INPUT.MAX_SIZE_TEST",
    "FREEZE_AT": "MODEL.BACKBONE.FREEZE_AT",
    "IMS_PER_BATCH": "SOLVER.IMS_PER_BATCH",
    "BASE_LR": "SOLVER.BASE_LR",
    "WEIGHT_DECAY": "SOLVER.WEIGHT_DECAY",
    "WEIGHT_DECAY_NORM": "SOLVER.WEIGHT_DECAY_NORM",
    "WARMUP_ITERS": "SOLVER.WARMUP_ITERS",
    "WARMUP_FACTOR": "SOLVER.WARMUP_FACTOR",
    "CHECKPOINT_PERIOD": "SOLVER.CHECKPOINT_PERIOD",
    "EVAL_PERIOD": "TEST.EVAL_PERIOD",
    "ROI_BATCH_SIZE_PER_IMAGE": "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "BACKBONE_NORM": "MODEL.RESNETS.NORM",
    "FPN_NORM": "MODEL.FPN.NORM",
}
# Head norms: every head config key that takes a norm.
_HEAD_NORM_KEYS = (
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.RETINANET.NORM",
    "MODEL.FCOS.NORM",
)
# Other Detectron2 keys every phase sets, and the phase key(s) that decide them.
_OTHER_CONTROLLED = {
    "INPUT.RANDOM_FLIP": "RANDOM_FLIP",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "MIN_SIZE_TRAIN (sampled by 'choice')",
    "INPUT.CROP": "AUGMENTATION fixed_size_crop with SCALE, RATIO_RANGE, CROP_SIZE",
    "SOLVER.MAX_ITER": "EPOCHS or MAX_ITER",
    "SOLVER.STEPS": "STEP_EPOCHS",
    "SOLVER.LR_SCHEDULER_NAME": "STEP_EPOCHS (warmup, then x0.1 at each step)",
    "SOLVER.AMP": "AMP",
    "TEST.AUG": "nothing: test-time augmentation is not supported",
}
# Detectron2 key (or node) -> the phase key(s) that decide it. Each phase overwrites these, so
# setting one outside DIRECT_PRETRAIN.<PHASE> is refused (:func:`check_phase_controlled`).
PHASE_CONTROLLED_KEYS = {
    **{d2_key: key for key, d2_key in _DIRECT_KEYS.items()},
    **{d2_key: "HEAD_NORM" for d2_key in _HEAD_NORM_KEYS},
    **_OTHER_CONTROLLED,
}
# Class-count key of each detector.
_NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "FCOSDetector": "MODEL.FCOS.NUM_CLASSES",
}


def _set(cfg: CfgNode, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def phase_config(cfg: CfgNode, phase: Phase | str, num_train_images: int) -> CfgNode:
    """A frozen Detectron2 config for ``phase`` of the pipeline ``cfg``.

    Args:
        cfg: the pipeline config (with the ``DIRECT_PRETRAIN`` node).
        phase: a resolved :class:`Phase`, or the name of one in ``DIRECT_PRETRAIN``.
        num_train_images: size of the training set, to turn epochs into iterations.

    Returns:
        A copy of ``cfg`` whose Detectron2 keys hold the phase's settings,
        ``DIRECT_PRETRAIN.PHASE`` set to the phase and ``OUTPUT_DIR`` to the phase folder.
    """
    if isinstance(phase, str):
        phase = YacsSystem().resolve(cfg, phase)
    out = cfg.clone()
    out.defrost()
    out.DIRECT_PRETRAIN.PHASE = phase.NAME
    out.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, phase.folder)
    out.MODEL.DEVICE = phase.DEVICE
    for key, d2_key in _DIRECT_KEYS.items():
        _set(out, d2_key, getattr(phase, key))
    for d2_key in _HEAD_NORM_KEYS:
        _set(out, d2_key, phase.HEAD_NORM)
    out.INPUT.RANDOM_FLIP = "horizontal" if phase.RANDOM_FLIP else "none"
    out.INPUT.CROP.ENABLED = False  # the phase's AUGMENTATION decides about cropping
    out.SOLVER.MAX_ITER, out.SOLVER.STEPS = phase.schedule(num_train_images)
    out.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    out.SOLVER.AMP.ENABLED = phase.AMP
    if phase.INIT == "scratch":
        out.MODEL.WEIGHTS = ""
    phase.KIND.adapt_config(out)  # e.g. AlignDet's box-domain model
    out.freeze()
    return out


def training_dicts(cfg: CfgNode) -> list[dict]:
    """The training set as Detectron2's default train loader reads it (its ``from_config``)."""
    return build_detection_train_loader.from_config(cfg, mapper=lambda d: d)["dataset"]


def _with(cfg: CfgNode, change) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    change(cfg)
    cfg.freeze()
    return cfg


class YacsSystem(ConfigSystem):
    resume_safe_keys = (
        "DATALOADER.NUM_WORKERS",
        "MODEL.DEVICE",
        "SOLVER.CHECKPOINT_PERIOD",
        "TEST.EVAL_PERIOD",
        "SOLVER.AMP.ENABLED",
        "OUTPUT_DIR",
    )
    device_key = "MODEL.DEVICE"
    output_dir_key = "OUTPUT_DIR"
    weights_key = "MODEL.WEIGHTS"
    keep_empty_override = "DATALOADER.FILTER_EMPTY_ANNOTATIONS False"

    def output_dir(self, cfg):
        return cfg.OUTPUT_DIR

    def weights(self, cfg):
        return cfg.MODEL.WEIGHTS

    def device(self, cfg):
        return cfg.MODEL.DEVICE

    def seed(self, cfg):
        return cfg.SEED

    def num_classes(self, cfg):
        key = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
        return {} if key is None else {key: lookup(cfg, key)}

    def pixel_stats(self, cfg):
        return list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)

    def with_weights(self, cfg, path):
        return _with(cfg, lambda c: c.MODEL.__setattr__("WEIGHTS", path))

    def with_pixel_stats(self, cfg, mean, std):
        def set_stats(c):
            c.MODEL.PIXEL_MEAN, c.MODEL.PIXEL_STD = list(mean), list(std)

        return _with(cfg, set_stats)

    def with_values(self, cfg, values):
        def change(c):
            for key, value in values.items():
                current = lookup(c, key)
                _set(c, key, tuple(value) if isinstance(current, tuple) else value)

        return _with(cfg, change)

    def anchor_layout(self, cfg):
        features = {
            "GeneralizedRCNN": cfg.MODEL.RPN.IN_FEATURES,
            "RetinaNet": cfg.MODEL.RETINANET.IN_FEATURES,
        }.get(cfg.MODEL.META_ARCHITECTURE)
        if features is None or cfg.MODEL.ANCHOR_GENERATOR.NAME != "DefaultAnchorGenerator":
            return None
        return (
            "MODEL.ANCHOR_GENERATOR.SIZES",
            "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
            list(features),
        )

    def has_roi_heads(self, cfg):
        return cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"

    def split_names(self, cfg):
        return list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)

    def with_train_names(self, cfg, names):
        return _with(cfg, lambda c: c.DATASETS.__setattr__("TRAIN", tuple(names)))

    def for_evaluation(self, pcfg, dataset, output_dir):
        def point(c):
            c.DATASETS.TEST = (dataset,)
            c.OUTPUT_DIR = output_dir

        return _with(pcfg, point)

    def save_pipeline(self, cfg, path):
        tree = yaml.safe_load(cfg.dump())
        for key in PHASE_CONTROLLED_KEYS:
            *parents, leaf = key.split(".")
            node = tree
            for parent in parents:
                node = node.get(parent, {})
            node.pop(leaf, None)
        header = (
            "# The pipeline config as it ran (pixel statistics resolved). Keys that each phase "
            "sets are left out:\n# each phase's values are in <phase>/phase_config.yaml.\n"
        )
        atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=True))

    def check(self, cfg):
        check_cpp_requirements(cfg)

    def train_dicts(self, cfg):
        return training_dicts(cfg)

    def image_format(self, cfg):
        return cfg.INPUT.FORMAT

    def phase_config(self, cfg, phase, num_images):
        return phase_config(cfg, phase, num_images)

    def build_model(self, pcfg, on_cpu=False):
        if on_cpu:
            pcfg = _with(pcfg, lambda c: c.MODEL.__setattr__("DEVICE", "cpu"))
        return build_logged_model(pcfg)

    def inference_size(self, pcfg):
        return int(pcfg.INPUT.MIN_SIZE_TEST), int(pcfg.INPUT.MAX_SIZE_TEST)

    def save(self, pcfg, path):
        atomic_write_text(path, pcfg.dump())

    def flat(self, pcfg):
        return flatten_dict(yaml.safe_load(pcfg.dump()))
