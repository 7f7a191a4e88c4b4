"""Phases: :func:`resolve_phase` turns a ``DIRECT_PRETRAIN.<PHASE>`` node into a checked
:class:`Phase`, the one record of a phase's settings every other module reads.

The config systems (:mod:`direct_pretrain.config_systems`) write a :class:`Phase` into a yacs
or LazyConfig config; trainers, the pipeline and prediction read the :class:`Phase` or the
resolved config, never the node.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from detectron2.data import transforms as T

from .config import phase_names
from .phase_kinds import PhaseConfigError, PhaseKind, phase_kind

__all__ = [
    "Phase",
    "PhaseConfigError",
    "active_phases",
    "check_phase_controlled",
    "resolve_phase",
    "schedule",
]


def active_phases(cfg) -> list[str]:
    """Phases to run: ``DIRECT_PRETRAIN.PHASE`` alone if set, else ``PIPELINE`` in order."""
    node = cfg.DIRECT_PRETRAIN
    phases = [node.PHASE] if node.PHASE else list(node.PIPELINE)
    known = phase_names(node)
    for name in phases:
        if name not in known:
            raise PhaseConfigError(
                f"DIRECT_PRETRAIN.PIPELINE/PHASE: unknown phase '{name}' "
                f"(known: {', '.join(known)})"
            )
    if not phases:
        raise PhaseConfigError("DIRECT_PRETRAIN.PIPELINE is empty")
    return phases


def _parent(cfg, dotted: str):
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    return node, leaf


def _controlling(key: str, controlled: dict[str, str]) -> str | None:
    for d2_key, phase_key in controlled.items():
        if key == d2_key or key.startswith(d2_key + "."):
            return phase_key
    return None


def check_phase_controlled(cfg, user_keys: dict[str, str], controlled: dict[str, str]) -> None:
    """Refuse Detectron2 keys that the phases set, when the user's config or command line sets
    them: they would be silently overwritten. The message names the phase keys to use.

    Args:
        cfg: the merged pipeline config.
        user_keys: ``{key: where it was set}`` (:func:`direct_pretrain.config.user_keys`).
        controlled: config key (or node) -> the phase key(s) deciding it (each config
            system has its map).

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


@dataclasses.dataclass(frozen=True)
class Phase:
    """A phase's settings, checked and resolved for the device it runs on.

    Fields carry the names of the ``DIRECT_PRETRAIN.<PHASE>`` keys (see
    :func:`direct_pretrain.config.new_phase_node` for their meaning), plus the phase's
    ``NAME``, its ``DEVICE`` ("cpu" when a GPU config runs without one) and its ``KIND``.
    Norms are resolved for the device (SyncBN runs as naiveSyncBN on CPU) and AMP is off on CPU.
    """

    NAME: str
    DEVICE: str
    INIT: str
    INIT_KEYS: str
    AUGMENTATION: str
    SCALE: tuple[int, int]
    RATIO_RANGE: tuple[float, float]
    CROP_SIZE: tuple[int, int]
    RESIZED_CACHE: bool
    MIN_SIZE_TRAIN: tuple[int, ...]
    MAX_SIZE_TRAIN: int
    MIN_SIZE_TEST: int
    MAX_SIZE_TEST: int
    RANDOM_FLIP: bool
    BACKBONE_NORM: str
    FPN_NORM: str
    HEAD_NORM: str
    FREEZE_AT: int
    BACKBONE_NORM_EVAL: bool
    IMS_PER_BATCH: int
    OPTIMIZER: str
    BASE_LR: float
    WEIGHT_DECAY: float
    WEIGHT_DECAY_NORM: float
    EPOCHS: float
    DATASET_REPEAT: int
    STEP_EPOCHS: tuple[float, ...]
    MAX_ITER: int
    WARMUP_ITERS: int
    WARMUP_FACTOR: float
    ROI_BATCH_SIZE_PER_IMAGE: int
    CHECKPOINT_PERIOD: int
    EVAL_PERIOD: int
    AMP: bool
    # What resolution changed from the node for the device, one sentence each (logged once per
    # phase by the pipeline; resolution itself is silent, as it runs wherever a phase is read).
    ADJUSTMENTS: tuple[str, ...] = ()

    @property
    def KIND(self) -> PhaseKind:  # noqa: N802 - named like the other fields
        return phase_kind(self.NAME)

    @property
    def folder(self) -> str:
        """The phase's folder name inside the run folder."""
        return self.NAME.lower()

    def schedule(self, num_images: int) -> tuple[int, tuple[int, ...]]:
        """Iterations and LR-drop iterations over ``num_images`` training images."""
        return schedule(self, num_images)

    def augmentation_specs(self, pixel_mean) -> list[tuple[type, dict]]:
        """``(class, kwargs)`` of the training augmentations (for yacs and LazyConfig)."""
        flip = [(T.RandomFlip, {"horizontal": True, "vertical": False})] if self.RANDOM_FLIP else []
        if self.AUGMENTATION == "fixed_size_crop":
            low, high = self.RATIO_RANGE
            height, width = self.SCALE
            resize = {"min_scale": low, "max_scale": high}
            resize.update(target_height=height, target_width=width)
            pad_value = float(sum(pixel_mean) / len(pixel_mean))
            crop = {"crop_size": tuple(self.CROP_SIZE), "pad": True, "pad_value": pad_value}
            return [(T.ResizeScale, resize), *flip, (T.FixedSizeCrop, crop)]
        resize = {"short_edge_length": tuple(self.MIN_SIZE_TRAIN), "max_size": self.MAX_SIZE_TRAIN}
        return [(T.ResizeShortestEdge, {**resize, "sample_style": "choice"}), *flip]

    def train_scale(self, height: float, width: float) -> float:
        """The typical factor an image of this size is resized by in training (the middle of
        the scale jitter, the middle of MIN_SIZE_TRAIN's choices)."""
        if self.AUGMENTATION == "fixed_size_crop":
            jitter = sum(self.RATIO_RANGE) / 2
            return jitter * min(self.SCALE[0] / height, self.SCALE[1] / width)
        sizes = sorted(self.MIN_SIZE_TRAIN)
        short = sizes[len(sizes) // 2]
        return min(short / min(height, width), self.MAX_SIZE_TRAIN / max(height, width))

    def test_scale(self, height: float, width: float) -> float:
        """The factor an image of this size is resized by for evaluation."""
        return min(self.MIN_SIZE_TEST / min(height, width), self.MAX_SIZE_TEST / max(height, width))

    def augmentations(self, pixel_mean) -> list[T.Augmentation]:
        """The training augmentations."""
        return [cls(**kwargs) for cls, kwargs in self.augmentation_specs(pixel_mean)]


_INITS = ("scratch", "previous", "weights")
_AUGMENTATIONS = ("fixed_size_crop", "shortest_edge")
_OPTIMIZERS = ("SGD", "AdamW")
_NORM_FIELDS = ("BACKBONE_NORM", "FPN_NORM", "HEAD_NORM")


def resolve_phase(cfg, name: str, device: str) -> Phase:
    """The checked settings of phase ``name`` of the pipeline config ``cfg``.

    The only reader of a ``DIRECT_PRETRAIN.<PHASE>`` node.

    Args:
        cfg: a yacs or LazyConfig config with the ``DIRECT_PRETRAIN`` node.
        name: the phase node's name, e.g. "PRETRAIN".
        device: the config's device (MODEL.DEVICE, train.device).

    Raises:
        PhaseConfigError: naming the key of an unknown phase, an invalid or unsafe setting.
    """
    root = cfg.DIRECT_PRETRAIN
    if name not in phase_names(root):
        raise PhaseConfigError(
            f"DIRECT_PRETRAIN.{name}: no such phase (known: {', '.join(phase_names(root))})"
        )
    node = root[name]
    _validate(name, node)
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    values, adjustments = {}, []
    for field in dataclasses.fields(Phase):
        if field.name in ("NAME", "DEVICE", "ADJUSTMENTS"):
            continue
        value = node[field.name]
        values[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    if device == "cpu":
        for key in _NORM_FIELDS:  # torch's SyncBatchNorm refuses CPU tensors
            if values[key] == "SyncBN":
                values[key] = "naiveSyncBN"
                adjustments.append(f"{key} SyncBN runs as naiveSyncBN on CPU")
        if values["AMP"]:
            values["AMP"] = False
            adjustments.append("mixed precision is GPU-only; training in fp32 on CPU")
    return Phase(NAME=name, DEVICE=device, ADJUSTMENTS=tuple(adjustments), **values)


def _validate(phase: str, node) -> None:
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


def schedule(settings, num_images: int) -> tuple[int, tuple[int, ...]]:
    """Iterations and LR-drop iterations of a phase (a :class:`Phase` or a phase node) over
    ``num_images`` training images."""
    iters_per_epoch = settings.DATASET_REPEAT * num_images / settings.IMS_PER_BATCH
    epoch_iters = max(1, math.ceil(settings.EPOCHS * iters_per_epoch))
    max_iter = settings.MAX_ITER if settings.MAX_ITER > 0 else epoch_iters
    steps = {
        min(max_iter - 1, round(max_iter * s / settings.EPOCHS))
        for s in settings.STEP_EPOCHS
        if s < settings.EPOCHS
    }
    return max_iter, tuple(sorted(s for s in steps if s > 0))
