"""``DirectPretrainTrainer``: Detectron2's DefaultTrainer with per-phase data, model and solver.

It is built from a *phase* config (:func:`direct_pretrain.phases.phase_config`), whose
Detectron2 keys already hold the phase's norms, sizes and schedule. The trainer adds what
those keys cannot express: the phase's resize augmentation (also used by PreciseBN, which
builds its own train loader), the optimizer choice, the evaluator and a wall-clock hook that
survives resumes.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import Counter
from collections.abc import Callable
from functools import partial

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetFromList,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from .checkpoint import SafeCheckpointer
from .coco_evaluator import CheckedCOCOEvaluator
from .data.datasets import cache_dir
from .data.mapper import CheckedDatasetMapper, WithoutSkipped
from .data.resized_cache import maybe_resized
from .modeling.norm_eval import BackboneNormEval
from .phase_kinds import phase_kind
from .phases import phase_node
from .utils.dist import build_on_main
from .utils.env import has_cpp_ops

__all__ = [
    "DirectPretrainTrainer",
    "PhaseTimer",
    "augmentation_specs",
    "build_train_augmentations",
    "training_dicts",
]

logger = logging.getLogger(__name__)

# Parameters (by their name in their module) never decayed by AdamW: position tables.
NO_DECAY_PARAMS = ("absolute_pos_embed", "relative_position_bias_table", "pos_embed", "cls_token")


def augmentation_specs(node, pixel_mean) -> list[tuple[type, dict]]:
    """``(class, kwargs)`` of a phase node's training augmentations (for yacs and LazyConfig)."""
    flip = [(T.RandomFlip, {"horizontal": True, "vertical": False})] if node.RANDOM_FLIP else []
    if node.AUGMENTATION == "fixed_size_crop":
        low, high = node.RATIO_RANGE
        height, width = node.SCALE
        return [
            (
                T.ResizeScale,
                {
                    "min_scale": low,
                    "max_scale": high,
                    "target_height": height,
                    "target_width": width,
                },
            ),
            *flip,
            (
                T.FixedSizeCrop,
                {
                    "crop_size": tuple(node.CROP_SIZE),
                    "pad": True,
                    "pad_value": float(sum(pixel_mean) / len(pixel_mean)),
                },
            ),
        ]
    return [
        (
            T.ResizeShortestEdge,
            {
                "short_edge_length": tuple(node.MIN_SIZE_TRAIN),
                "max_size": node.MAX_SIZE_TRAIN,
                "sample_style": "choice",
            },
        ),
        *flip,
    ]


def build_train_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """The training augmentations of the phase ``cfg`` belongs to."""
    return [
        cls(**kwargs) for cls, kwargs in augmentation_specs(phase_node(cfg), cfg.MODEL.PIXEL_MEAN)
    ]


def phase_training_dicts(cfg: CfgNode) -> list[dict]:
    """The training set of the phase: from the low-resolution cache if the phase uses one
    (built by the main process while the others wait)."""
    dicts = training_dicts(cfg)
    node, cache = phase_node(cfg), cache_dir(cfg.DIRECT_PRETRAIN)
    skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
    return build_on_main(
        lambda: maybe_resized(dicts, node, cache, skip_bad, cfg.DATALOADER.NUM_WORKERS),
        "the low-resolution cache",
    )


def training_dicts(cfg: CfgNode) -> list[dict]:
    """The training set as Detectron2's default train loader reads it (its ``from_config``)."""
    return build_detection_train_loader.from_config(cfg, mapper=lambda d: d)["dataset"]


class PhaseTimer(HookBase):
    """A phase's wall-clock and CPU seconds (this process, all its threads; data-loader
    workers not included) and its evaluations along the way: their results, iteration and
    the training time before them, their own time kept apart. Saved in checkpoints, so a
    resumed phase adds up (its training time excludes the evaluations before the resume)."""

    def __init__(self) -> None:
        self.seconds_before = 0.0
        self.cpu_seconds_before = 0.0
        self.eval_seconds = 0.0
        self.eval_cpu_seconds = 0.0
        self.history: list[dict] = []
        self._start = None
        self._cpu_start = None

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.seconds_before + running

    @property
    def cpu_seconds(self) -> float:
        running = time.process_time() - self._cpu_start if self._cpu_start is not None else 0.0
        return self.cpu_seconds_before + running

    def evaluate(self, run: Callable[[], dict], iteration: int) -> dict:
        """``run()``'s results, timed apart from training and appended (box AP, AP50) to
        ``history`` with the ``iteration``s done and the training time so far."""
        start, cpu_start = time.perf_counter(), time.process_time()
        results = run()
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        bbox = results.get("bbox", {})
        self.history.append(
            {
                "iteration": iteration,
                "train_seconds": round(self.seconds - self.eval_seconds, 1),
                "train_cpu_seconds": round(self.cpu_seconds - self.eval_cpu_seconds, 1),
                **{k: bbox[k] for k in ("AP", "AP50") if k in bbox},
            }
        )
        return results

    def state_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_cpu_seconds": self.eval_cpu_seconds,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state["seconds"])
        # Older checkpoints have no CPU time nor evaluations.
        self.cpu_seconds_before = float(state.get("cpu_seconds", 0.0))
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.eval_cpu_seconds = float(state.get("eval_cpu_seconds", 0.0))
        self.history = list(state.get("history", []))


class DirectPretrainTrainer(DefaultTrainer):
    """DefaultTrainer whose model, loader and optimizer follow the config's current phase."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = build_model(cfg)
        norms = Counter(type(m).__name__ for m in model.modules() if _is_norm(m))
        logger.info("Phase %s: norm layers %s", cfg.DIRECT_PRETRAIN.PHASE, dict(norms))
        return model

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        loader = phase_kind(cfg.DIRECT_PRETRAIN.PHASE).build_train_loader(cfg)
        if loader is not None:  # e.g. AlignDet's two-view box-domain loader
            return loader
        dataset = DatasetFromList(phase_training_dicts(cfg), copy=False)
        mapper = CheckedDatasetMapper(
            cfg, is_train=True, fallback=dataset, augmentations=build_train_augmentations(cfg)
        )
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = CheckedDatasetMapper(cfg, is_train=False)
        return WithoutSkipped(build_detection_test_loader(cfg, dataset_name, mapper=mapper))

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        if phase_node(cfg).OPTIMIZER == "SGD":
            return build_optimizer(cfg, model)
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

    def build_hooks(self):
        """Default hooks with atomic checkpoints, a resumable timer and recorded evaluation."""
        self.checkpointer = SafeCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.timer = PhaseTimer()
        self.eval_results: dict = {}
        default = super().build_hooks()
        if not comm.is_main_process():  # SafeCheckpointer.save is collective: see there
            at = next(i for i, h in enumerate(default) if isinstance(h, hooks.EvalHook))
            checkpoint_period = self.cfg.SOLVER.CHECKPOINT_PERIOD
            default.insert(at, hooks.PeriodicCheckpointer(self.checkpointer, checkpoint_period))
        kind = phase_kind(self.cfg.DIRECT_PRETRAIN.PHASE)
        extra = kind.hooks(self.cfg)
        if phase_node(self.cfg).BACKBONE_NORM_EVAL:
            extra.append(BackboneNormEval())
        if not kind.evaluates:  # e.g. AlignDet's box-domain model has no classifier
            default = [h for h in default if not isinstance(h, hooks.EvalHook)]
        return [self.timer, *extra] + [
            (
                hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate)
                if isinstance(h, hooks.EvalHook)
                else h
            )
            for h in default
        ]

    def _evaluate(self) -> dict:
        run = partial(self.test, self.cfg, self.model)
        self.eval_results = self.timer.evaluate(run, min(self.iter + 1, self.max_iter))
        return self.eval_results


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(
        module,
        (
            torch.nn.modules.batchnorm._NormBase,
            torch.nn.GroupNorm,
            torch.nn.LayerNorm,
            FrozenBatchNorm2d,
        ),
    )
