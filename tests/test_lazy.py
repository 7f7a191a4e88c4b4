"""The yacs and LazyConfig versions of the demo recipe build the same phases."""

from __future__ import annotations

import pytest
import torch

from direct_pretrain.config_systems import load_config, system_of
from direct_pretrain.engine import build_train_augmentations

from conftest import ROOT

YACS = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml")
LAZY = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.py")


def _phase(path: str, phase: str):
    cfg = load_config(path)
    kind = system_of(cfg)
    return kind, kind.phase_config(cfg, phase, num_images=98)


def _params(augmentation) -> tuple:
    """An augmentation's class and constructor values (lists and tuples alike)."""
    values = {
        k: tuple(v) if isinstance(v, (list, tuple)) else v
        for k, v in vars(augmentation).items()
        if not k.startswith("_")
    }
    return type(augmentation).__name__, values


def _signature(model: torch.nn.Module) -> dict:
    """Parameter and buffer names and shapes, and the class of every module."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    classes = {name: type(m).__name__ for name, m in model.named_modules()}
    return {"shapes": shapes, "classes": classes}


@pytest.mark.parametrize("phase", ["PRETRAIN", "FINETUNE"])
def test_same_model_per_phase(phase):
    (yk, ycfg), (lk, lcfg) = _phase(YACS, phase), _phase(LAZY, phase)
    torch.manual_seed(0)
    y = _signature(yk.build_model(ycfg, on_cpu=True))
    torch.manual_seed(0)
    lm = lk.build_model(lcfg, on_cpu=True)
    assert _signature(lm) == y
    norm = "backbone.bottom_up.res3.0.conv1.norm"
    expected = {"PRETRAIN": "BatchNorm2d", "FINETUNE": "FrozenBatchNorm2d"}[phase]
    assert dict(lm.named_modules())[norm].__class__.__name__ == expected


@pytest.mark.parametrize("phase", ["PRETRAIN", "FINETUNE"])
def test_same_augmentations_schedule_and_solver(phase):
    (_, y), (_, lz) = _phase(YACS, phase), _phase(LAZY, phase)
    from detectron2.config import instantiate

    lazy_augs = [_params(a) for a in instantiate(lz.dataloader.train.mapper.augmentations)]
    yacs_augs = [_params(a) for a in build_train_augmentations(y)]
    assert lazy_augs == yacs_augs and len(yacs_augs) == (3 if phase == "PRETRAIN" else 2)
    test_aug = instantiate(lz.dataloader.test.mapper.augmentations)[0]
    assert (test_aug.short_edge_length[0], test_aug.max_size) == (
        y.INPUT.MIN_SIZE_TEST,
        y.INPUT.MAX_SIZE_TEST,
    )
    assert lz.train.max_iter == y.SOLVER.MAX_ITER
    assert list(lz.lr_multiplier.scheduler.milestones) == list(y.SOLVER.STEPS)
    assert lz.optimizer.lr == y.SOLVER.BASE_LR
    assert lz.dataloader.train.total_batch_size == y.SOLVER.IMS_PER_BATCH


def test_backbone_norm_eval_applies_to_lazyconfig_runs(synthetic_data, tmp_path):
    """BACKBONE_NORM_EVAL keeps the backbone's BN statistics at their init in a LazyConfig
    phase, as in a yacs one, while the affine parameters train."""
    from direct_pretrain.pipeline import run_pipeline

    from conftest import shrink

    results = {}
    for norm_eval in (False, True):
        cfg = shrink(load_config(LAZY), synthetic_data, tmp_path / str(norm_eval))
        cfg.DIRECT_PRETRAIN.PHASE = "PRETRAIN"
        cfg.DIRECT_PRETRAIN.PRETRAIN.BACKBONE_NORM_EVAL = norm_eval
        cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR = 0.02
        summary = run_pipeline(cfg)
        state = torch.load(summary["final_model"], weights_only=True)["model"]
        results[norm_eval] = state
    prefix = "backbone.bottom_up.res2.0.conv1.norm."
    fixed, trained = results[True], results[False]
    assert torch.equal(fixed[prefix + "running_mean"], torch.zeros_like(fixed[prefix + "weight"]))
    assert torch.equal(fixed[prefix + "running_var"], torch.ones_like(fixed[prefix + "weight"]))
    assert not torch.equal(fixed[prefix + "weight"], torch.ones_like(fixed[prefix + "weight"]))
    assert not torch.equal(trained[prefix + "running_mean"], fixed[prefix + "running_mean"])
