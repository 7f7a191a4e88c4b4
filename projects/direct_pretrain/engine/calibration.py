"""Timing a phase's training step: a few iterations of its model, loader and optimizer in this
process alone (no hooks, no DDP, no files), for the planner's calibration."""

from __future__ import annotations

import copy
import time

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils.events import EventStorage

from .lazy_trainer import LazyPhaseTrainer
from .yacs_trainer import DirectPretrainTrainer

__all__ = ["time_steps"]

# The timed steps run at the LR of a warmup's first iteration (Detectron2's WARMUP_FACTOR): from
# random weights, the full LR of a large batch diverges within a few steps (measured: the demo's
# pre-training at batch 16, LR 0.04, in the 5th step), and the LR does not change a step's cost.
LR_FACTOR = 0.001


def _parts(pcfg):
    """Model, optimizer, training loader and AMP flag of a resolved phase config."""
    if isinstance(pcfg, CfgNode):
        model = DirectPretrainTrainer.build_model(pcfg)
        optimizer = DirectPretrainTrainer.build_optimizer(pcfg, model)
        loader = DirectPretrainTrainer.build_train_loader(pcfg, start_iter=0)
        return model, optimizer, loader, pcfg.SOLVER.AMP.ENABLED
    model = instantiate(pcfg.model).to(pcfg.train.device)
    optimizer_cfg = copy.deepcopy(pcfg.optimizer)
    optimizer_cfg.params.model = model
    loader = LazyPhaseTrainer.build_train_loader(pcfg, start_iter=0)
    return model, instantiate(optimizer_cfg), loader, pcfg.train.amp.enabled


def time_steps(pcfg, warmup: int = 2, steps: int = 4) -> dict:
    """Seconds per training iteration of a resolved phase config, timed over ``steps``
    iterations after ``warmup`` untimed ones (from random weights, at ``LR_FACTOR`` of the LR;
    the loader's workers start during warm-up), and the peak GPU memory (MB; 0 on CPU)."""
    model, optimizer, loader, amp = _parts(pcfg)
    for group in optimizer.param_groups:
        group["lr"] *= LR_FACTOR
    model.train()
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, loader, optimizer)
    cuda = next(model.parameters()).is_cuda
    with EventStorage(0):
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
            trainer.iter = i
            trainer.run_step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    del trainer, loader
    return {
        "seconds_per_iter": round(seconds, 4),
        "peak_mb": round(peak, 1),
        "steps": steps,
        "warmup": warmup,
    }
