"""LazyConfig support: Python configs run through the same pipeline with the same phase node.

A LazyConfig file for this project defines Detectron2's usual ``model``, ``dataloader``,
``optimizer`` and ``train`` (reusing ``model_zoo.get_config("common/...")``), plus
``DIRECT_PRETRAIN = default_direct_pretrain()`` with the keys of the yacs node. For each phase,
:func:`lazy_phase_config` rewrites the lazy objects as :func:`phases.phase_config` rewrites
yacs keys, and :class:`LazyPhaseTrainer` trains it with Detectron2's SimpleTrainer and hooks.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import weakref
from functools import partial

import torch
import yaml
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import DatasetFromList
from detectron2.data import transforms as T
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.registry import locate
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import DictConfig, OmegaConf

from .checkpoint import SafeCheckpointer
from .coco_evaluator import CheckedCOCOEvaluator
from .config import get_cfg
from .data.datasets import cache_dir
from .data.mapper import CheckedDatasetMapper, WithoutSkipped
from .data.resized_cache import maybe_resized
from .phase_kinds import phase_kind
from .phases import PhaseConfigError, schedule, validate_phase
from .trainer import (
    NO_DECAY_PARAMS,
    PhaseTimer,
    augmentation_specs,
)
from .utils.dist import build_on_main
from .utils.env import has_cpp_ops
from .utils.io import flatten_dict

__all__ = [
    "LAZY_CONTROLLED_PATHS",
    "LazyPhaseTrainer",
    "default_direct_pretrain",
    "lazy_evaluate",
    "lazy_phase_config",
    "lazy_to_flat_dict",
]

logger = logging.getLogger(__name__)

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


def default_direct_pretrain() -> dict:
    """The ``DIRECT_PRETRAIN`` node's defaults as a plain dict, for LazyConfig files."""
    return yaml.safe_load(get_cfg().DIRECT_PRETRAIN.dump())


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


def _set_norms(cfg: DictConfig, phase: str, node) -> None:
    norms = {key: node[key] for key in _NORM_PATHS}
    cascade_heads = (cfg.model.get("roi_heads") or {}).get("box_heads") or ()
    if cfg.train.device == "cpu":  # torch's SyncBatchNorm refuses CPU tensors
        norms = {k: "naiveSyncBN" if v == "SyncBN" else v for k, v in norms.items()}
    for key, paths in _NORM_PATHS.items():
        if key == "HEAD_NORM" and cascade_heads:
            for head in cascade_heads:  # Cascade R-CNN
                head.conv_norm = norms[key]
            continue
        _apply(cfg, phase, key, norms[key], paths)


def _set_optimizer(cfg: DictConfig, node) -> None:
    optimizer = cfg.optimizer
    optimizer.lr = node.BASE_LR
    optimizer.weight_decay = node.WEIGHT_DECAY
    optimizer.params.weight_decay_norm = node.WEIGHT_DECAY_NORM
    if node.OPTIMIZER == "AdamW":
        optimizer._target_ = torch.optim.AdamW
        optimizer.pop("momentum", None)
        optimizer.pop("nesterov", None)
        optimizer.params.overrides = {name: {"weight_decay": 0.0} for name in NO_DECAY_PARAMS}


def _set_data(cfg: DictConfig, node) -> None:
    train, test = cfg.dataloader.train, cfg.dataloader.test
    train.total_batch_size = node.IMS_PER_BATCH
    skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
    for mapper in (train.mapper, test.mapper):
        mapper._target_ = CheckedDatasetMapper
        mapper.skip_bad_images = skip_bad
    train.mapper.seed = cfg.train.get("seed", 0)
    train.mapper.augmentations = [
        L(cls)(**kwargs) for cls, kwargs in augmentation_specs(node, cfg.model.pixel_mean)
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


def lazy_phase_config(cfg: DictConfig, phase: str, num_train_images: int) -> DictConfig:
    """A LazyConfig for ``phase``: a copy of ``cfg`` with the phase's settings applied.

    Args:
        cfg: the pipeline LazyConfig (with ``DIRECT_PRETRAIN``).
        phase: a name in ``DIRECT_PRETRAIN.PIPELINE``.
        num_train_images: size of the training set, to turn epochs into iterations.
    """
    node = cfg.DIRECT_PRETRAIN[phase]
    validate_phase(phase, node)
    if not phase_kind(phase).supports_lazy:
        raise PhaseConfigError(
            f"the {phase} phase (e.g. AlignDet's BOX_DOMAIN) needs a yacs config; the "
            "LazyConfig path runs detector phases (PRETRAIN, FINETUNE)"
        )
    out = copy.deepcopy(cfg)
    node = out.DIRECT_PRETRAIN[phase]
    out.DIRECT_PRETRAIN.PHASE = phase
    out.train.output_dir = os.path.join(cfg.train.output_dir, phase.lower())
    if str(out.train.device).startswith("cuda") and not torch.cuda.is_available():
        out.train.device = "cpu"
    _set_norms(out, phase, node)
    _apply(out, phase, "FREEZE_AT", node.FREEZE_AT, ("model.backbone.bottom_up.freeze_at",))
    _apply(
        out,
        phase,
        "ROI_BATCH_SIZE_PER_IMAGE",
        node.ROI_BATCH_SIZE_PER_IMAGE,
        ("model.roi_heads.batch_size_per_image",),
    )
    _set_data(out, node)
    _set_optimizer(out, node)
    max_iter, steps = schedule(node, num_train_images)
    out.train.max_iter = max_iter
    out.train.checkpointer.period = node.CHECKPOINT_PERIOD
    out.train.eval_period = node.EVAL_PERIOD
    out.train.amp.enabled = bool(node.AMP) and out.train.device != "cpu"
    out.lr_multiplier = L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1**k for k in range(len(steps) + 1)],
            milestones=list(steps),
            num_updates=max_iter,
        ),
        warmup_length=min(1.0, node.WARMUP_ITERS / max_iter),
        warmup_factor=node.WARMUP_FACTOR,
    )
    if node.INIT == "scratch":
        out.train.init_checkpoint = ""
    return out


def lazy_evaluate(cfg: DictConfig, model: torch.nn.Module) -> dict:
    """COCO evaluation of ``model`` on ``dataloader.test`` (printed as Detectron2's table)."""
    results = inference_on_dataset(
        model,
        WithoutSkipped(instantiate(cfg.dataloader.test)),
        instantiate(cfg.dataloader.evaluator),
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


class LazyPhaseTrainer:
    """Trains one LazyConfig phase with Detectron2's SimpleTrainer (AMPTrainer) and hooks.

    Exposes what the pipeline reads from :class:`~direct_pretrain.trainer.DirectPretrainTrainer`:
    ``resume_or_load``, ``train``, ``start_iter``, ``max_iter``, ``iter``, ``checkpointer``,
    ``timer`` and ``eval_results``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        model = instantiate(cfg.model).to(cfg.train.device)
        optimizer_cfg = copy.deepcopy(cfg.optimizer)
        optimizer_cfg.params.model = model
        optimizer = instantiate(optimizer_cfg)
        loader = self._train_loader(cfg)
        model = create_ddp_model(model, **cfg.train.ddp)
        trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
        self.trainer = trainer_cls(model, loader, optimizer)
        self.checkpointer = SafeCheckpointer(
            model, cfg.train.output_dir, trainer=weakref.proxy(self.trainer)
        )
        self.timer = PhaseTimer()
        self.eval_results: dict = {}
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        main = comm.is_main_process()
        # On every process (SafeCheckpointer.save is collective); only the main one writes,
        # and deletes old checkpoints.
        checkpointing = (
            cfg.train.checkpointer if main else {"period": cfg.train.checkpointer.period}
        )
        self.trainer.register_hooks(
            [
                self.timer,
                hooks.IterationTimer(),
                hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
                hooks.PeriodicCheckpointer(self.checkpointer, **checkpointing),
                hooks.EvalHook(cfg.train.eval_period, self._evaluate),
                (
                    hooks.PeriodicWriter(
                        default_writers(cfg.train.output_dir, self.max_iter),
                        period=cfg.train.log_period,
                    )
                    if main
                    else None
                ),
            ]
        )

    @staticmethod
    def _train_loader(cfg: DictConfig):
        """``dataloader.train`` with the checked mapper drawing skips from the same dataset."""
        loader_cfg = copy.deepcopy(cfg.dataloader.train)
        node = cfg.DIRECT_PRETRAIN[cfg.DIRECT_PRETRAIN.PHASE]
        dicts, cache = instantiate(loader_cfg.dataset), cache_dir(cfg.DIRECT_PRETRAIN)
        skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
        resized = build_on_main(
            lambda: maybe_resized(dicts, node, cache, skip_bad, loader_cfg.num_workers),
            "the low-resolution cache",
        )
        dataset = DatasetFromList(resized, copy=False)
        mapper = instantiate(loader_cfg.mapper)
        mapper.fallback = dataset
        loader_cfg.dataset, loader_cfg.mapper = dataset, mapper
        return instantiate(loader_cfg)

    @property
    def iter(self) -> int:
        return self.trainer.iter

    def resume_or_load(self, resume: bool = True) -> None:
        self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.trainer.iter + 1

    def train(self) -> None:
        self.trainer.train(self.start_iter, self.max_iter)

    def _evaluate(self) -> dict:
        run = partial(lazy_evaluate, self.cfg, self.trainer.model)
        self.eval_results = self.timer.evaluate(run, min(self.iter + 1, self.max_iter))
        return self.eval_results


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
