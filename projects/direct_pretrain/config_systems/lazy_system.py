"""The LazyConfig system: a :class:`~direct_pretrain.phases.Phase` written into lazy objects.

A LazyConfig file for this project defines Detectron2's usual ``model``, ``dataloader``,
``optimizer`` and ``train`` (reusing ``model_zoo.get_config("common/...")``), plus
``DIRECT_PRETRAIN = default_direct_pretrain()`` with the keys of the yacs node.
:func:`lazy_phase_config` rewrites the lazy objects for a phase as the yacs system rewrites
Detectron2 keys.
"""

from __future__ import annotations

import copy
import inspect
import os

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.solver import WarmupParamScheduler
from detectron2.utils.registry import locate
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import DictConfig, OmegaConf

from ..config import default_direct_pretrain
from ..data.coco_evaluator import CheckedCOCOEvaluator
from ..data.mapper import CheckedDatasetMapper
from ..modeling import NO_DECAY_PARAMS
from ..phase_kinds import PhaseConfigError
from ..phases import Phase
from ..utils.env import has_cpp_ops
from ..utils.io import flatten_dict
from .base import ConfigSystem

__all__ = ["LAZY_CONTROLLED_PATHS", "LazySystem", "lazy_phase_config", "lazy_to_flat_dict"]

# Where each phase norm key lands in the lazy models of Detectron2's common configs.
_NORM_PATHS = {
    "BACKBONE_NORM": ("model.backbone.bottom_up.stem.norm", "model.backbone.bottom_up.stages.norm"),
    "FPN_NORM": ("model.backbone.norm",),
    "HEAD_NORM": (
        "model.roi_heads.box_head.conv_norm",
        "model.roi_heads.mask_head.conv_norm",
        "model.head.norm",
    ),
}

# LazyConfig paths each phase sets, and the phase key(s) that decide them (overriding one on
# the command line is refused).
LAZY_CONTROLLED_PATHS = {
    "optimizer.lr": "BASE_LR",
    "optimizer.weight_decay": "WEIGHT_DECAY",
    "optimizer.params.weight_decay_norm": "WEIGHT_DECAY_NORM",
    "optimizer._target_": "OPTIMIZER",
    "dataloader.train.total_batch_size": "IMS_PER_BATCH",
    "dataloader.train.mapper.augmentations": "AUGMENTATION and its size keys, RANDOM_FLIP",
    "dataloader.test.mapper.augmentations": "MIN_SIZE_TEST and MAX_SIZE_TEST",
    "train.max_iter": "EPOCHS or MAX_ITER",
    "train.checkpointer.period": "CHECKPOINT_PERIOD",
    "train.eval_period": "EVAL_PERIOD",
    "train.amp.enabled": "AMP",
    "lr_multiplier": "STEP_EPOCHS, WARMUP_ITERS and WARMUP_FACTOR",
    "model.backbone.bottom_up.freeze_at": "FREEZE_AT",
    "model.roi_heads.batch_size_per_image": "ROI_BATCH_SIZE_PER_IMAGE",
    **{path: key for key, paths in _NORM_PATHS.items() for path in paths},
}


def _parent(cfg: DictConfig, path: str):
    """The node holding the last key of ``path``, or None if a step is missing or None."""
    node = cfg
    *parents, _ = path.split(".")
    for key in parents:
        node = node.get(key) if isinstance(node, DictConfig) else None
        if node is None:
            return None
    return node


def _assign(cfg: DictConfig, path: str, value) -> bool:
    """Set ``path`` to ``value`` if the config has it, or if its object's ``_target_`` takes
    that argument; return whether it did."""
    node = _parent(cfg, path)
    leaf = path.rpartition(".")[2]
    if node is None or (leaf not in node and not _takes(node.get("_target_"), leaf)):
        return False
    node[leaf] = value
    return True


def _takes(target, argument: str) -> bool:
    """Whether calling ``target`` (a LazyCall's class or function) accepts ``argument``."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except ImportError:
            return False
    try:
        return argument in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _apply(cfg: DictConfig, phase: str, key: str, value, paths: tuple[str, ...]) -> None:
    """Set ``value`` of phase ``key`` at every path the lazy model has; a value other than the
    default that lands nowhere is an error naming the paths."""
    applied = [_assign(cfg, path, value) for path in paths]
    if not any(applied) and value != default_direct_pretrain()[phase][key]:
        raise PhaseConfigError(
            f"DIRECT_PRETRAIN.{phase}.{key} = {value!r} cannot be applied to this LazyConfig "
            f"model: it has none of {', '.join(paths)}. Set it in the model instead, or leave "
            "the phase key at its default."
        )


def _set_norms(cfg: DictConfig, phase: Phase) -> None:
    cascade_heads = (cfg.model.get("roi_heads") or {}).get("box_heads") or ()
    for key, paths in _NORM_PATHS.items():
        if key == "HEAD_NORM" and cascade_heads:
            for head in cascade_heads:  # Cascade R-CNN
                head.conv_norm = phase.HEAD_NORM
            continue
        _apply(cfg, phase.NAME, key, getattr(phase, key), paths)


def _set_optimizer(cfg: DictConfig, node: Phase) -> None:
    optimizer = cfg.optimizer
    optimizer.lr = node.BASE_LR
    optimizer.weight_decay = node.WEIGHT_DECAY
    optimizer.params.weight_decay_norm = node.WEIGHT_DECAY_NORM
    if node.OPTIMIZER == "AdamW":
        optimizer._target_ = torch.optim.AdamW
        optimizer.pop("momentum", None)
        optimizer.pop("nesterov", None)
        optimizer.params.overrides = {name: {"weight_decay": 0.0} for name in NO_DECAY_PARAMS}


def _set_data(cfg: DictConfig, node: Phase) -> None:
    train, test = cfg.dataloader.train, cfg.dataloader.test
    train.total_batch_size = node.IMS_PER_BATCH
    skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
    for mapper in (train.mapper, test.mapper):
        mapper._target_ = CheckedDatasetMapper
        mapper.skip_bad_images = skip_bad
    train.mapper.augmentations = [
        L(cls)(**kwargs) for cls, kwargs in node.augmentation_specs(cfg.model.pixel_mean)
    ]
    test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=node.MIN_SIZE_TEST, max_size=node.MAX_SIZE_TEST)
    ]
    evaluator = cfg.dataloader.evaluator
    evaluator._target_ = CheckedCOCOEvaluator
    evaluator.skip_bad_images = skip_bad
    evaluator.use_fast_impl = has_cpp_ops()
    evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    has_masks = (cfg.model.get("roi_heads") or {}).get("mask_head") is not None
    evaluator.tasks = ["bbox", "segm"] if has_masks else ["bbox"]


def lazy_phase_config(cfg: DictConfig, phase: Phase | str, num_train_images: int) -> DictConfig:
    """A LazyConfig for ``phase``: a copy of ``cfg`` with the phase's settings applied.

    Args:
        cfg: the pipeline LazyConfig (with ``DIRECT_PRETRAIN``).
        phase: a resolved :class:`Phase`, or the name of one in ``DIRECT_PRETRAIN``.
        num_train_images: size of the training set, to turn epochs into iterations.
    """
    if isinstance(phase, str):
        phase = LazySystem().resolve(cfg, phase)
    if not phase.KIND.supports_lazy:
        raise PhaseConfigError(
            f"the {phase.NAME} phase (e.g. AlignDet's BOX_DOMAIN) needs a yacs config; the "
            "LazyConfig path runs detector phases (PRETRAIN, FINETUNE)"
        )
    out = copy.deepcopy(cfg)
    out.DIRECT_PRETRAIN.PHASE = phase.NAME
    out.train.output_dir = os.path.join(cfg.train.output_dir, phase.folder)
    out.train.device = phase.DEVICE
    _set_norms(out, phase)
    _apply(out, phase.NAME, "FREEZE_AT", phase.FREEZE_AT, ("model.backbone.bottom_up.freeze_at",))
    _apply(
        out,
        phase.NAME,
        "ROI_BATCH_SIZE_PER_IMAGE",
        phase.ROI_BATCH_SIZE_PER_IMAGE,
        ("model.roi_heads.batch_size_per_image",),
    )
    _set_data(out, phase)
    _set_optimizer(out, phase)
    max_iter, steps = phase.schedule(num_train_images)
    out.train.max_iter = max_iter
    out.train.checkpointer.period = phase.CHECKPOINT_PERIOD
    out.train.eval_period = phase.EVAL_PERIOD
    out.train.amp.enabled = bool(phase.AMP)
    out.lr_multiplier = L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1**k for k in range(len(steps) + 1)],
            milestones=list(steps),
            num_updates=max_iter,
        ),
        warmup_length=min(1.0, phase.WARMUP_ITERS / max_iter),
        warmup_factor=phase.WARMUP_FACTOR,
    )
    if phase.INIT == "scratch":
        out.train.init_checkpoint = ""
    return out


def lazy_to_flat_dict(cfg: DictConfig) -> dict:
    """The config as a flat ``{dotted.key: value}`` dict, classes written as their path."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, type) or callable(value):
            return f"{value.__module__}.{value.__qualname__}"
        return value

    return flatten_dict(plain(OmegaConf.to_container(cfg, resolve=True)))


def _as_list(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def lazy_test_resize(cfg: DictConfig):
    """The one ``ResizeShortestEdge`` of ``dataloader.test.mapper.augmentations``."""
    augs = [a for a in cfg.dataloader.test.mapper.augmentations if "short_edge_length" in a]
    if len(augs) != 1:
        raise ValueError(
            "LazyConfig: dataloader.test.mapper.augmentations must hold one "
            "ResizeShortestEdge (the test resize)"
        )
    return augs[0]


class LazySystem(ConfigSystem):
    resume_safe_keys = (
        "train.device",
        "train.checkpointer.period",
        "train.checkpointer.max_to_keep",
        "train.eval_period",
        "train.log_period",
        "train.amp.enabled",
        "train.output_dir",
        "dataloader.train.num_workers",
        "dataloader.test.num_workers",
        "dataloader.evaluator.output_dir",
    )
    device_key = "train.device"
    output_dir_key = "train.output_dir"
    weights_key = "train.init_checkpoint"
    keep_empty_override = "dataloader.train.dataset.filter_empty=False"

    def output_dir(self, cfg):
        return cfg.train.output_dir

    def weights(self, cfg):
        return cfg.train.init_checkpoint

    def device(self, cfg):
        return cfg.train.device

    def seed(self, cfg):
        return cfg.train.get("seed", -1)  # as Detectron2's default_setup reads it

    def num_classes(self, cfg):
        model = cfg.model
        if "roi_heads" in model and "num_classes" in model.roi_heads:
            return {"model.roi_heads.num_classes": model.roi_heads.num_classes}
        return {"model.num_classes": model.num_classes} if "num_classes" in model else {}

    def pixel_stats(self, cfg):
        return list(cfg.model.pixel_mean), list(cfg.model.pixel_std)

    def with_weights(self, cfg, path):
        cfg = copy.deepcopy(cfg)
        cfg.train.init_checkpoint = path
        return cfg

    def with_pixel_stats(self, cfg, mean, std):
        cfg = copy.deepcopy(cfg)
        cfg.model.pixel_mean, cfg.model.pixel_std = list(mean), list(std)
        return cfg

    def with_values(self, cfg, values):
        cfg = copy.deepcopy(cfg)
        for key, value in values.items():
            OmegaConf.update(cfg, key, list(value) if isinstance(value, tuple) else value)
        return cfg

    def anchor_layout(self, cfg):
        for generator, features in (
            ("model.proposal_generator.anchor_generator", "model.proposal_generator.in_features"),
            ("model.anchor_generator", "model.head_in_features"),
        ):
            node, names = OmegaConf.select(cfg, generator), OmegaConf.select(cfg, features)
            if node is not None and "sizes" in node and names is not None:
                return f"{generator}.sizes", f"{generator}.aspect_ratios", list(names)
        return None

    def has_roi_heads(self, cfg):
        return "roi_heads" in cfg.model

    def split_names(self, cfg):
        return (
            _as_list(cfg.dataloader.train.dataset.names),
            _as_list(cfg.dataloader.test.dataset.names),
        )

    def with_train_names(self, cfg, names):
        cfg = copy.deepcopy(cfg)
        cfg.dataloader.train.dataset.names = list(names)
        return cfg

    def for_evaluation(self, pcfg, dataset, output_dir):
        pcfg = copy.deepcopy(pcfg)
        pcfg.dataloader.test.dataset.names = dataset
        pcfg.dataloader.evaluator.dataset_name = dataset
        pcfg.dataloader.evaluator.output_dir = os.path.join(output_dir, "inference")
        pcfg.train.output_dir = output_dir
        return pcfg

    def save_pipeline(self, cfg, path):
        LazyConfig.save(cfg, path)

    def check(self, cfg):
        pass  # Detectron2's common LazyConfig models need no C++ op; a custom one fails on use

    def train_dicts(self, cfg):
        return instantiate(cfg.dataloader.train.dataset)

    def image_format(self, cfg):
        return cfg.dataloader.train.mapper.image_format

    def phase_config(self, cfg, phase, num_images):
        return lazy_phase_config(cfg, phase, num_images)

    def build_model(self, pcfg, on_cpu=False):
        return instantiate(pcfg.model).to("cpu" if on_cpu else pcfg.train.device)

    def inference_size(self, pcfg):
        resize = lazy_test_resize(pcfg)
        short = resize.short_edge_length
        short = short[0] if isinstance(short, (list, tuple)) or hasattr(short, "__len__") else short
        return int(short), int(resize.max_size)

    def save(self, pcfg, path):
        LazyConfig.save(pcfg, path)

    def flat(self, pcfg):
        return lazy_to_flat_dict(pcfg)
