"""The trainer really builds each phase's model norms, resize augmentation and optimizer."""

from __future__ import annotations

import torch
from conftest import tiny_cfg
from detectron2.data import transforms as T
from detectron2.layers import FrozenBatchNorm2d

from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.phases import phase_config
from direct_pretrain.trainer import DirectPretrainTrainer, build_train_augmentations


def _phase(synthetic_data, tmp_path, phase):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    return phase_config(cfg, phase, 8)


def _backbone_norms(model) -> set[type]:
    return {type(m) for name, m in model.named_modules()
            if name.startswith("backbone.bottom_up") and name.endswith("norm")}


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
