"""Turn the pipeline config and one phase node into a plain Detectron2 config."""

from __future__ import annotations

import logging
import math
import os

import torch
from detectron2.config import CfgNode

from .config import PHASE_NAMES
from .phase_kinds import phase_kind

__all__ = [
    "PHASE_CONTROLLED_KEYS",
    "active_phases",
    "check_phase_controlled",
    "phase_config",
    "phase_node",
    "schedule",
    "validate_phase",
    "PhaseConfigError",
]

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
_INITS = ("scratch", "previous", "weights")
_AUGMENTATIONS = ("fixed_size_crop", "shortest_edge")
_OPTIMIZERS = ("SGD", "AdamW")


class PhaseConfigError(ValueError):
    """A phase setting is invalid or unsafe; the message names the key."""


def active_phases(cfg) -> list[str]:
    """Phases to run: ``DIRECT_PRETRAIN.PHASE`` alone if set, else ``PIPELINE`` in order."""
    node = cfg.DIRECT_PRETRAIN
    phases = [node.PHASE] if node.PHASE else list(node.PIPELINE)
    for name in phases:
        if name not in PHASE_NAMES or name not in node:
            raise PhaseConfigError(
                f"DIRECT_PRETRAIN.PIPELINE/PHASE: unknown phase '{name}' "
                f"(known: {', '.join(PHASE_NAMES)})"
            )
    if not phases:
        raise PhaseConfigError("DIRECT_PRETRAIN.PIPELINE is empty")
    return phases


def phase_node(cfg):
    """The node of the phase a resolved phase config belongs to."""
    return cfg.DIRECT_PRETRAIN[cfg.DIRECT_PRETRAIN.PHASE]


def _parent(cfg: CfgNode, dotted: str) -> tuple[CfgNode, str]:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    return node, leaf


def _set(cfg: CfgNode, dotted: str, value) -> None:
    node, leaf = _parent(cfg, dotted)
    node[leaf] = value


def _controlling(key: str, controlled: dict[str, str]) -> str | None:
    for d2_key, phase_key in controlled.items():
        if key == d2_key or key.startswith(d2_key + "."):
            return phase_key
    return None


def check_phase_controlled(
    cfg, user_keys: dict[str, str], controlled: dict[str, str] = PHASE_CONTROLLED_KEYS
) -> None:
    """Refuse Detectron2 keys that the phases set, when the user's config or command line sets
    them: they would be silently overwritten. The message names the phase keys to use.

    Args:
        cfg: the merged pipeline config.
        user_keys: ``{key: where it was set}`` (:func:`direct_pretrain.config.user_keys`).
        controlled: config key (or node) -> the phase key(s) deciding it.

    Raises:
        PhaseConfigError: naming every such key, its value, where it was set and what to use.
    """
    phases = active_phases(cfg)
    problems = []
    for key, where in sorted(user_keys.items()):
        phase_key = _controlling(key, controlled)
        if phase_key is None:
            continue
        node, leaf = _parent(cfg, key)
        if phase_key.isidentifier():
            instead = ", ".join(f"DIRECT_PRETRAIN.{p}.{phase_key}" for p in phases)
        else:
            instead = f"{phase_key} in " + ", ".join(f"DIRECT_PRETRAIN.{p}" for p in phases)
        problems.append(f"{key} = {node[leaf]!r} (from {where}): use {instead}")
    if problems:
        raise PhaseConfigError(
            "these keys are set per phase by DIRECT_PRETRAIN and would be ignored:\n  "
            + "\n  ".join(problems)
            + "\nSet the phase keys instead (each phase has its own value)."
        )


def validate_phase(phase: str, node) -> None:
    """Raise :class:`PhaseConfigError` naming the key of an invalid or unsafe phase setting."""
    key = f"DIRECT_PRETRAIN.{phase}"
    for field, allowed in (
        ("INIT", _INITS),
        ("AUGMENTATION", _AUGMENTATIONS),
        ("OPTIMIZER", _OPTIMIZERS),
    ):
        if node[field] not in allowed:
            raise PhaseConfigError(
                f"{key}.{field} = '{node[field]}' is not one of {', '.join(allowed)}"
            )
    if node.INIT == "scratch":
        if node.BACKBONE_NORM == "FrozenBN":
            raise PhaseConfigError(
                f"{key}.BACKBONE_NORM = FrozenBN with INIT scratch: frozen BN keeps the random "
                "init statistics (mean 0, var 1) and identity affine forever, so the backbone "
                "never normalises its activations. Use BN (large batch), SyncBN or GN."
            )
        if node.FREEZE_AT > 0:
            raise PhaseConfigError(
                f"{key}.FREEZE_AT = {node.FREEZE_AT} with INIT scratch: the first "
                f"{node.FREEZE_AT} backbone stage(s) would stay at their random init. "
                "Set it to 0 when training from scratch."
            )
    if node.FPN_NORM == "FrozenBN" or node.HEAD_NORM == "FrozenBN":
        raise PhaseConfigError(f"{key}: FrozenBN is only supported as BACKBONE_NORM")
    if node.IMS_PER_BATCH <= 0 or node.BASE_LR <= 0:
        raise PhaseConfigError(f"{key}: IMS_PER_BATCH and BASE_LR must be positive")
    if node.EPOCHS <= 0 and node.MAX_ITER <= 0:
        raise PhaseConfigError(f"{key}: set EPOCHS or MAX_ITER to a positive value")


def schedule(node, num_images: int) -> tuple[int, tuple[int, ...]]:
    """Iterations and LR-drop iterations of a phase over ``num_images`` training images."""
    iters_per_epoch = node.DATASET_REPEAT * num_images / node.IMS_PER_BATCH
    epoch_iters = max(1, math.ceil(node.EPOCHS * iters_per_epoch))
    max_iter = node.MAX_ITER if node.MAX_ITER > 0 else epoch_iters
    steps = {
        min(max_iter - 1, round(max_iter * s / node.EPOCHS))
        for s in node.STEP_EPOCHS
        if s < node.EPOCHS
    }
    return max_iter, tuple(sorted(s for s in steps if s > 0))


def phase_config(cfg: CfgNode, phase: str, num_train_images: int) -> CfgNode:
    """A frozen Detectron2 config for ``phase`` of the pipeline ``cfg``.

    Args:
        cfg: the pipeline config (with the ``DIRECT_PRETRAIN`` node).
        phase: a name in ``DIRECT_PRETRAIN.PIPELINE``.
        num_train_images: size of the training set, to turn epochs into iterations.

    Returns:
        A copy of ``cfg`` whose Detectron2 keys hold the phase's settings,
        ``DIRECT_PRETRAIN.PHASE`` set to ``phase`` and ``OUTPUT_DIR`` set to the phase folder.
    """
    node = cfg.DIRECT_PRETRAIN[phase]
    validate_phase(phase, node)
    out = cfg.clone()
    out.defrost()
    out.DIRECT_PRETRAIN.PHASE = phase
    out.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, phase.lower())
    for key, d2_key in _DIRECT_KEYS.items():
        _set(out, d2_key, node[key])
    for d2_key in _HEAD_NORM_KEYS:
        _set(out, d2_key, node.HEAD_NORM)
    out.INPUT.RANDOM_FLIP = "horizontal" if node.RANDOM_FLIP else "none"
    out.INPUT.CROP.ENABLED = False  # the phase's AUGMENTATION decides about cropping
    out.SOLVER.MAX_ITER, out.SOLVER.STEPS = schedule(node, num_train_images)
    out.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    out.SOLVER.AMP.ENABLED = node.AMP
    if node.INIT == "scratch":
        out.MODEL.WEIGHTS = ""
    phase_kind(phase).adapt_config(out)  # e.g. AlignDet's box-domain model
    _adapt_to_device(out)
    out.freeze()
    return out


def _adapt_to_device(cfg: CfgNode) -> None:
    """Run a GPU config on a CPU-only machine without editing it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu":
        if cfg.SOLVER.AMP.ENABLED:
            logger.info("Mixed precision is GPU-only; training in fp32 on CPU.")
            cfg.SOLVER.AMP.ENABLED = False
        for key in ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", *_HEAD_NORM_KEYS):
            node, leaf = _parent(cfg, key)
            if node[leaf] == "SyncBN":  # torch's SyncBatchNorm refuses CPU tensors
                node[leaf] = "naiveSyncBN"
