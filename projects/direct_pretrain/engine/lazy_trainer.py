"""``LazyPhaseTrainer``: one LazyConfig phase trained with Detectron2's public pieces.

Detectron2's ``tools/lazyconfig_train_net.py`` is a script, not an API, so the trainer is put
together here from the same public parts (``SimpleTrainer``/``AMPTrainer``, ``create_ddp_model``,
its hooks and writers) plus the hooks the yacs trainer adds (:mod:`.hooks`).
"""

from __future__ import annotations

import copy
import weakref
from functools import partial

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig

from ..checkpoint import SafeCheckpointer, resume_iteration
from ..config_systems import LazySystem
from ..data.datasets import cache_dir
from ..data.mapper import WithoutSkipped
from ..data.resized_cache import maybe_resized
from ..data.resumable import resumable_train_loader
from ..utils.dist import build_on_main
from .hooks import PhaseTimer, SeededIterations, phase_hooks, run_seed
from .stop import GracefulStop

__all__ = ["LazyPhaseTrainer", "lazy_evaluate"]


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

    Exposes what the pipeline reads from :class:`.DirectPretrainTrainer`:
    ``resume_or_load``, ``train``, ``register_hooks``, ``start_iter``, ``max_iter``, ``iter``,
    ``checkpointer``, ``timer`` and ``eval_results``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        model = instantiate(cfg.model).to(cfg.train.device)
        optimizer_cfg = copy.deepcopy(cfg.optimizer)
        optimizer_cfg.params.model = model
        optimizer = instantiate(optimizer_cfg)
        loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, **cfg.train.ddp)
        trainer_cls = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
        self.trainer = trainer_cls(model, loader, optimizer)
        self.checkpointer = SafeCheckpointer(
            model, cfg.train.output_dir, trainer=weakref.proxy(self.trainer)
        )
        self.timer = PhaseTimer()
        phase = LazySystem().phase(cfg)
        self.eval_results: dict = {}
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        main = comm.is_main_process()
        # On every process (SafeCheckpointer.save is collective); only the main one writes,
        # and deletes old checkpoints, keeping at least two (one to fall back to if the last
        # is damaged).
        checkpointing = (
            {**cfg.train.checkpointer} if main else {"period": cfg.train.checkpointer.period}
        )
        if checkpointing.get("max_to_keep") is not None:
            checkpointing["max_to_keep"] = max(2, checkpointing["max_to_keep"])
        self.trainer.register_hooks(
            [
                SeededIterations(run_seed(LazySystem().seed(cfg))),
                self.timer,
                *phase_hooks(cfg, phase),
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
                GracefulStop(self.checkpointer),
            ]
        )

    @staticmethod
    def build_train_loader(cfg: DictConfig, start_iter: int | None = None):
        """``dataloader.train``'s dataset, mapper and sizes in a loader whose first batch is that
        of iteration ``start_iter`` (by default where ``resume_or_load`` resumes:
        :func:`~direct_pretrain.data.resumable.resumable_train_loader`), the checked mapper
        drawing skips from the same dataset."""
        loader_cfg = copy.deepcopy(cfg.dataloader.train)
        phase = LazySystem().phase(cfg)
        dicts, cache = instantiate(loader_cfg.dataset), cache_dir(cfg.DIRECT_PRETRAIN)
        skip_bad = cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip"
        resized = build_on_main(
            lambda: maybe_resized(dicts, phase, cache, skip_bad, loader_cfg.num_workers),
            "the low-resolution cache",
        )
        dataset = DatasetFromList(resized, copy=False)
        mapper = instantiate(loader_cfg.mapper)
        mapper.fallback = dataset
        seed = run_seed(LazySystem().seed(cfg))
        return resumable_train_loader(
            dataset,
            mapper,
            TrainingSampler(len(dataset), seed=seed),
            seed=seed,
            start_iter=resume_iteration(cfg.train.output_dir) if start_iter is None else start_iter,
            total_batch_size=loader_cfg.total_batch_size,
            aspect_ratio_grouping=loader_cfg.get("aspect_ratio_grouping", True),
            num_workers=loader_cfg.num_workers,
        )

    @property
    def iter(self) -> int:
        return self.trainer.iter

    def resume_or_load(self, resume: bool = True) -> None:
        self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.trainer.iter + 1

    def register_hooks(self, hooks_: list) -> None:
        """Hooks after those of the phase (Detectron2's ``TrainerBase.register_hooks``)."""
        self.trainer.register_hooks(hooks_)

    def train(self) -> None:
        self.trainer.train(self.start_iter, self.max_iter)

    def _evaluate(self) -> dict:
        run = partial(lazy_evaluate, self.cfg, self.trainer.model)
        self.eval_results = self.timer.evaluate(run, min(self.iter + 1, self.max_iter))
        return self.eval_results
