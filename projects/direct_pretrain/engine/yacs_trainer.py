"""``DirectPretrainTrainer``: Detectron2's DefaultTrainer with per-phase data, model and solver.

It is built from a resolved phase config (:func:`direct_pretrain.config_systems.phase_config`),
whose Detectron2 keys already hold the phase's norms, sizes and schedule, and reads the rest
from the phase's :class:`~direct_pretrain.phases.Phase`: the resize augmentation (also used by
PreciseBN, which builds its own train loader), the optimizer, the low-resolution cache and the
phase's hooks.
"""

from __future__ import annotations

import logging
import os
import weakref
from functools import partial

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.engine import DefaultTrainer, hooks
from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import SafeCheckpointer, resume_iteration
from ..config_systems import YacsSystem, training_dicts
from ..data.coco_evaluator import CheckedCOCOEvaluator
from ..data.datasets import cache_dir
from ..data.mapper import CheckedDatasetMapper, WithoutSkipped
from ..data.resized_cache import maybe_resized
from ..data.resumable import resumable_train_loader
from ..modeling import NO_DECAY_PARAMS
from ..utils.dist import build_on_main
from ..utils.env import has_cpp_ops
from .hooks import PhaseTimer, SeededIterations, phase_hooks, run_seed
from .stop import GracefulStop

__all__ = ["DirectPretrainTrainer", "build_train_augmentations", "phase_training_dicts"]

logger = logging.getLogger(__name__)


def build_train_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """The training augmentations of the phase ``cfg`` belongs to."""
    return YacsSystem().phase(cfg).augmentations(cfg.MODEL.PIXEL_MEAN)


def phase_training_dicts(cfg: CfgNode) -> list[dict]:
    """The training set of the phase: from the low-resolution cache if the phase uses one
    (built by the main process while the others wait)."""
    dicts = training_dicts(cfg)
    phase, cache = YacsSystem().phase(cfg), cache_dir(cfg.DIRECT_PRETRAIN)
    skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
    return build_on_main(
        lambda: maybe_resized(dicts, phase, cache, skip_bad, cfg.DATALOADER.NUM_WORKERS),
        "the low-resolution cache",
    )


def _train_sampler(cfg: CfgNode, dicts: list[dict], seed: int) -> TrainingSampler:
    """Detectron2's training sampler of ``DATALOADER.SAMPLER_TRAIN``, with ``seed``."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN {name!r}: TrainingSampler or RepeatFactorTrainingSampler"
    )


class DirectPretrainTrainer(DefaultTrainer):
    """DefaultTrainer whose model, loader and optimizer follow the config's current phase."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        return YacsSystem().build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int | None = None):
        """The phase's training loader; its first batch is that of iteration ``start_iter``
        (by default the one ``resume_or_load`` resumes at), as in an uninterrupted phase (see
        :func:`~direct_pretrain.data.resumable.resumable_train_loader` for when exactly)."""
        loader = YacsSystem().phase(cfg).KIND.build_train_loader(cfg)
        if loader is not None:  # e.g. AlignDet's two-view box-domain loader
            return loader
        dicts = phase_training_dicts(cfg)
        dataset = DatasetFromList(dicts, copy=False)
        mapper = CheckedDatasetMapper(
            cfg, is_train=True, fallback=dataset, augmentations=build_train_augmentations(cfg)
        )
        start_iter = resume_iteration(cfg.OUTPUT_DIR) if start_iter is None else start_iter
        grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING
        if start_iter > 0 and grouping and len({d["width"] > d["height"] for d in dicts}) > 1:
            logger.warning(
                "Resuming at iteration %d with images both wider than tall and not: with "
                "DATALOADER.ASPECT_RATIO_GROUPING the batches from here differ from an "
                "uninterrupted run's (the groups' partly filled batches are not kept).",
                start_iter,
            )
        seed = run_seed(cfg.SEED)
        return resumable_train_loader(
            dataset,
            mapper,
            _train_sampler(cfg, dicts, seed),
            seed=seed,
            start_iter=start_iter,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=grouping,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = CheckedDatasetMapper(cfg, is_train=False)
        return WithoutSkipped(build_detection_test_loader(cfg, dataset_name, mapper=mapper))

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        if YacsSystem().phase(cfg).OPTIMIZER == "SGD":
            return build_optimizer(cfg, model)
        # Detectron2's build_optimizer is SGD only; its parameter groups serve AdamW too.
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            overrides={name: {"weight_decay": 0.0} for name in NO_DECAY_PARAMS},
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        tasks = (
            ("bbox",)
            + (("segm",) if cfg.MODEL.MASK_ON else ())
            + (("keypoints",) if cfg.MODEL.KEYPOINT_ON else ())
        )
        return CheckedCOCOEvaluator(
            dataset_name,
            tasks=tasks,
            output_dir=output_folder,
            use_fast_impl=has_cpp_ops(),
            skip_bad_images=cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip",
        )

    def state_dict(self) -> dict:
        """DefaultTrainer's state, with the optimizer's where Detectron2 leaves it out (v0.6
        saves neither its SimpleTrainer's state nor the optimizer: momentum would restart)."""
        state = super().state_dict()
        if "_trainer" not in state:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "optimizer" in state:  # older checkpoints have none
            self.optimizer.load_state_dict(state["optimizer"])

    def build_hooks(self):
        """Detectron2's default hooks, with atomic checkpoints on every process, a resumable
        timer, the phase's hooks and evaluation recorded by the timer."""
        self.checkpointer = SafeCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.timer = PhaseTimer()
        self.eval_results: dict = {}
        phase = YacsSystem().phase(self.cfg)
        default = super().build_hooks()
        if not comm.is_main_process():  # SafeCheckpointer.save is collective: see there
            at = next(i for i, h in enumerate(default) if isinstance(h, hooks.EvalHook))
            checkpoint_period = self.cfg.SOLVER.CHECKPOINT_PERIOD
            default.insert(at, hooks.PeriodicCheckpointer(self.checkpointer, checkpoint_period))
        if not phase.KIND.evaluates:  # e.g. AlignDet's box-domain model has no classifier
            default = [h for h in default if not isinstance(h, hooks.EvalHook)]
        evaluation = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate)
        default = [evaluation if isinstance(h, hooks.EvalHook) else h for h in default]
        return [
            SeededIterations(run_seed(self.cfg.SEED)),
            self.timer,
            *phase_hooks(self.cfg, phase),
            *default,
            GracefulStop(self.checkpointer),
        ]

    def _evaluate(self) -> dict:
        run = partial(self.test, self.cfg, self.model)
        self.eval_results = self.timer.evaluate(run, min(self.iter + 1, self.max_iter))
        return self.eval_results
