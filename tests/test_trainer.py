"""The trainer really builds each phase's model norms, resize augmentation and optimizer."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.layers import FrozenBatchNorm2d
from PIL import Image

from direct_pretrain.config_systems import phase_config
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.engine import DirectPretrainTrainer, PhaseTimer, build_train_augmentations

from conftest import tiny_cfg


def _phase(synthetic_data, tmp_path, phase):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    return phase_config(cfg, phase, 8)


def _backbone_norms(model) -> set[type]:
    return {
        type(m)
        for name, m in model.named_modules()
        if name.startswith("backbone.bottom_up") and name.endswith("norm")
    }


def test_models_swap_norms(synthetic_data, tmp_path):
    pre = DirectPretrainTrainer.build_model(_phase(synthetic_data, tmp_path, "PRETRAIN"))
    fine = DirectPretrainTrainer.build_model(_phase(synthetic_data, tmp_path, "FINETUNE"))
    assert _backbone_norms(pre) == {torch.nn.BatchNorm2d}
    assert _backbone_norms(fine) == {FrozenBatchNorm2d}
    assert all(p.requires_grad for p in pre.backbone.parameters())


def test_augmentations_follow_the_phase(synthetic_data, tmp_path):
    pre = build_train_augmentations(_phase(synthetic_data, tmp_path, "PRETRAIN"))
    fine = build_train_augmentations(_phase(synthetic_data, tmp_path, "FINETUNE"))
    assert [type(a) for a in pre] == [T.ResizeScale, T.RandomFlip, T.FixedSizeCrop]
    assert [type(a) for a in fine] == [T.ResizeShortestEdge, T.RandomFlip]


def test_built_loaders_produce_the_phase_sizes(synthetic_data, tmp_path):
    for phase, check in (
        ("PRETRAIN", lambda h, w: (h, w) == (32, 32)),  # cropped and padded to CROP_SIZE
        ("FINETUNE", lambda h, w: min(h, w) == 64),  # shortest edge at MIN_SIZE_TRAIN
    ):
        cfg = _phase(synthetic_data, tmp_path, phase)
        batch = next(iter(DirectPretrainTrainer.build_train_loader(cfg)))
        assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
        for item in batch:
            assert check(*item["image"].shape[1:]), (phase, item["image"].shape)


def test_adamw_skips_decay_on_norms_and_position_tables(synthetic_data, tmp_path):
    cfg = _phase(synthetic_data, tmp_path, "PRETRAIN")
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.PRETRAIN.OPTIMIZER = "AdamW"
    model = DirectPretrainTrainer.build_model(cfg)
    model.register_parameter("relative_position_bias_table", torch.nn.Parameter(torch.zeros(3)))
    optimizer = DirectPretrainTrainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.relative_position_bias_table)] == 0.0
    norm = model.backbone.bottom_up.stem.conv1.norm
    assert decay[id(norm.weight)] == 0.0
    assert decay[id(model.backbone.bottom_up.stem.conv1.weight)] == cfg.SOLVER.WEIGHT_DECAY


def test_resized_cache_gives_the_same_training_sizes(synthetic_data, tmp_path):
    from direct_pretrain.config_systems import training_dicts
    from direct_pretrain.data.resized_cache import copy_scale, maybe_resized

    cfg = _phase(synthetic_data, tmp_path, "PRETRAIN")
    node = cfg.DIRECT_PRETRAIN.PRETRAIN.clone()
    node.defrost()
    assert node.RESIZED_CACHE and list(node.SCALE) == [32, 32]
    dicts = training_dicts(cfg)
    small = maybe_resized(dicts, node, tmp_path / "cache", workers=1)
    top = max(node.RATIO_RANGE)
    for full, copy in zip(dicts, small):
        scale = copy_scale(full["height"], full["width"], 32 * top, 32 * top)
        assert (
            (copy["height"], copy["width"])
            == (round(64 * scale), round(64 * scale))
            == Image.open(copy["file_name"]).size[::-1]
        )
        assert copy["annotations"][0]["bbox"] == pytest.approx(
            [v * copy["width"] / 64 for v in full["annotations"][0]["bbox"]]
        )
        # ResizeScale's output size depends only on its target: same from either image.
        aug = T.ResizeScale(top, top, 32, 32)
        out_full = aug.get_transform(np.zeros((full["height"], full["width"], 3), np.uint8))
        out_copy = aug.get_transform(np.zeros((copy["height"], copy["width"], 3), np.uint8))
        assert (out_full.new_h, out_full.new_w) == (out_copy.new_h, out_copy.new_w)
    stamp = (tmp_path / "cache" / "resized").stat().st_mtime_ns
    assert maybe_resized(dicts, node, tmp_path / "cache") == small  # cached
    assert (tmp_path / "cache" / "resized").stat().st_mtime_ns == stamp
    node.RESIZED_CACHE = False
    assert maybe_resized(dicts, node, tmp_path / "cache") is dicts


def test_resumed_timer_keeps_evaluations_apart():
    """A phase resumed from a checkpoint keeps its evaluation history and does not count the
    evaluations before the resume as training time."""

    def slow_evaluation() -> dict:
        time.sleep(0.3)
        return {"bbox": {"AP": 1.0, "AP50": 2.0}}

    first = PhaseTimer()
    first.before_train()
    first.evaluate(slow_evaluation, iteration=10)
    resumed = PhaseTimer()
    resumed.load_state_dict(first.state_dict())  # as a checkpoint carries it
    resumed.before_train()
    resumed.evaluate(slow_evaluation, iteration=20)

    assert [h["iteration"] for h in resumed.history] == [10, 20]
    assert resumed.history[0]["AP"] == 1.0 and resumed.history[1]["AP50"] == 2.0
    assert resumed.eval_seconds >= 0.6
    # Nothing but evaluations ran: the training time is (close to) nothing, not 0.3 s.
    assert resumed.seconds >= 0.6
    assert resumed.history[-1]["train_seconds"] < 0.2
