"""LazyConfig support: Python configs run through the same pipeline with the same phase node.

A LazyConfig file for this project defines Detectron2's usual ``model``, ``dataloader``,
``optimizer`` and ``train`` (reusing ``model_zoo.get_config("common/...")``), plus
``DIRECT_PRETRAIN = default_direct_pretrain()`` with the keys of the yacs node. For each phase,
:func:`lazy_phase_config` rewrites the lazy objects as :func:`phases.phase_config` rewrites
yacs keys, and :class:`LazyPhaseTrainer` trains it with Detectron2's SimpleTrainer and hooks.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import weakref

import torch
import yaml
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import DatasetFromList
from detectron2.data import transforms as T
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import WarmupParamScheduler
from detectron2.utils import comm
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import DictConfig, OmegaConf

from .checkpoint import SafeCheckpointer
from .config import get_cfg
from .data.datasets import cache_dir
from .data.mapper import CheckedDatasetMapper
from .data.resized_cache import maybe_resized
from .phases import PhaseConfigError, schedule, validate_phase
from .trainer import (
    NO_DECAY_PARAMS,
    PhaseTimer,
    augmentation_specs,
    phase_writers,
    record_evaluation,
)
from .utils.env import has_cpp_ops
from .utils.io import flatten_dict

__all__ = [
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


def _assign(cfg: DictConfig, path: str, value) -> None:
    node = _parent(cfg, path)
    if node is not None:
        node[path.rpartition(".")[2]] = value


def _set_norms(cfg: DictConfig, node) -> None:
    norms = {key: node[key] for key in _NORM_PATHS}
    if cfg.train.device == "cpu":  # torch's SyncBatchNorm refuses CPU tensors
        norms = {k: "naiveSyncBN" if v == "SyncBN" else v for k, v in norms.items()}
    for key, paths in _NORM_PATHS.items():
        for path in paths:
            _assign(cfg, path, norms[key])
    for head in (cfg.model.get("roi_heads") or {}).get("box_heads") or ():  # Cascade R-CNN
        head.conv_norm = norms["HEAD_NORM"]


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
    for mapper in (train.mapper, test.mapper):
        mapper._target_ = CheckedDatasetMapper
    train.mapper.skip_bad_images = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
    train.mapper.seed = cfg.train.get("seed", 0)
    train.mapper.augmentations = [
        L(cls)(**kwargs) for cls, kwargs in augmentation_specs(node, cfg.model.pixel_mean)
    ]
    test.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=node.MIN_SIZE_TEST, max_size=node.MAX_SIZE_TEST)
    ]
    evaluator = cfg.dataloader.evaluator
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
    if phase == "BOX_DOMAIN":
        raise PhaseConfigError(
            "the BOX_DOMAIN (AlignDet) phase needs a yacs config; the "
            "LazyConfig path runs PRETRAIN and FINETUNE"
        )
    out = copy.deepcopy(cfg)
    node = out.DIRECT_PRETRAIN[phase]
    out.DIRECT_PRETRAIN.PHASE = phase
    out.train.output_dir = os.path.join(cfg.train.output_dir, phase.lower())
    if str(out.train.device).startswith("cuda") and not torch.cuda.is_available():
        out.train.device = "cpu"
    _set_norms(out, node)
    _assign(out, "model.backbone.bottom_up.freeze_at", node.FREEZE_AT)
    _assign(out, "model.roi_heads.batch_size_per_image", node.ROI_BATCH_SIZE_PER_IMAGE)
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
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


class LazyPhaseTrainer:
    """Trains one LazyConfig phase with Detectron2's SimpleTrainer (AMPTrainer) and hooks.

    Exposes what the pipeline reads from :class:`~direct_pretrain.trainer.DirectPretrainTrainer`:
    ``resume_or_load``, ``train``, ``start_iter``, ``max_iter``, ``iter``, ``checkpointer``,
    ``timer``, ``eval_results``, ``eval_history`` and ``eval_seconds``.
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
        self.eval_history: list[dict] = []
        self.eval_seconds = 0.0
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        main = comm.is_main_process()
        self.trainer.register_hooks(
            [
                self.timer,
                hooks.IterationTimer(),
                hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
                (
                    hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer)
                    if main
                    else None
                ),
                hooks.EvalHook(cfg.train.eval_period, self._evaluate),
                (
                    hooks.PeriodicWriter(
                        phase_writers(cfg.train.output_dir, self.max_iter),
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
        if comm.is_main_process():
            maybe_resized(dicts, node, cache, loader_cfg.num_workers)
        comm.synchronize()
        dataset = DatasetFromList(maybe_resized(dicts, node, cache), copy=False)
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
        start = time.perf_counter()
        self.eval_results = lazy_evaluate(self.cfg, self.trainer.model)
        self.eval_seconds += time.perf_counter() - start
        record_evaluation(self)
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
