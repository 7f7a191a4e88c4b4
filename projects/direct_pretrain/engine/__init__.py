"""Phase trainers: one for yacs configs, one for LazyConfig, sharing their hooks."""

from __future__ import annotations

from detectron2.config import CfgNode

from .calibration import time_steps
from .hooks import AllRanksFinite, PhaseTimer, phase_hooks
from .lazy_trainer import LazyPhaseTrainer, lazy_evaluate
from .pace import BudgetPace, PaceChanged
from .stop import GracefulStop, StopRequested
from .yacs_trainer import DirectPretrainTrainer, build_train_augmentations, phase_training_dicts

__all__ = [
    "AllRanksFinite",
    "BudgetPace",
    "DirectPretrainTrainer",
    "GracefulStop",
    "PaceChanged",
    "StopRequested",
    "LazyPhaseTrainer",
    "PhaseTimer",
    "build_train_augmentations",
    "build_trainer",
    "evaluate",
    "lazy_evaluate",
    "phase_hooks",
    "phase_training_dicts",
    "time_steps",
]


def build_trainer(pcfg):
    """The trainer of a resolved phase config (yacs or LazyConfig)."""
    return DirectPretrainTrainer(pcfg) if isinstance(pcfg, CfgNode) else LazyPhaseTrainer(pcfg)


def evaluate(pcfg, model) -> dict:
    """COCO evaluation of ``model`` with the test settings of a resolved phase config."""
    if isinstance(pcfg, CfgNode):
        return DirectPretrainTrainer.test(pcfg, model)
    return lazy_evaluate(pcfg, model)
