"""Phase resolution: schedule arithmetic, per-phase keys, guards and device adaptation."""

from __future__ import annotations

import pytest
import torch

from direct_pretrain import get_cfg
from direct_pretrain.config_systems import phase_config
from direct_pretrain.phases import PhaseConfigError, active_phases, schedule

from conftest import tiny_cfg


def test_schedule_epochs_repeat_and_steps():
    node = get_cfg().DIRECT_PRETRAIN.FINETUNE.clone()
    node.IMS_PER_BATCH, node.EPOCHS, node.STEP_EPOCHS, node.DATASET_REPEAT = 16, 12.0, (8, 11), 1
    # COCO train2017 with images that have annotations: 117266 -> the usual ~90k "1x".
    max_iter, steps = schedule(node, 117266)
    assert max_iter == 87950
    assert steps == (58633, 80621)
    node.DATASET_REPEAT, node.STEP_EPOCHS, node.IMS_PER_BATCH = 4, (), 64
    assert schedule(node, 117266) == (87950, ())  # P1x: 12 epochs x 4 repeats at batch 64


def test_max_iter_overrides_and_keeps_relative_steps():
    node = get_cfg().DIRECT_PRETRAIN.FINETUNE.clone()
    node.MAX_ITER, node.EPOCHS, node.STEP_EPOCHS = 120, 12.0, (8.0, 11.0)
    assert schedule(node, 1000) == (120, (80, 110))
    node.MAX_ITER = 2  # drops that would land on the last iteration or before the first
    assert schedule(node, 1000) == (2, (1,))


def test_phase_keys_land_in_detectron2_keys(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    pre = phase_config(cfg, "PRETRAIN", 8)
    fine = phase_config(cfg, "FINETUNE", 8)
    assert pre.MODEL.RESNETS.NORM == "BN" and fine.MODEL.RESNETS.NORM == "FrozenBN"
    assert pre.SOLVER.IMS_PER_BATCH == 4 and fine.SOLVER.IMS_PER_BATCH == 2
    assert pre.INPUT.MIN_SIZE_TEST == 32 and fine.INPUT.MIN_SIZE_TEST == 64
    assert pre.OUTPUT_DIR.endswith("pretrain") and fine.OUTPUT_DIR.endswith("finetune")
    assert pre.DIRECT_PRETRAIN.PHASE == "PRETRAIN"
    assert pre.MODEL.WEIGHTS == ""
    assert pre.SOLVER.STEPS == () and pre.SOLVER.MAX_ITER == 2


def test_from_scratch_guards(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.PRETRAIN.BACKBONE_NORM = "FrozenBN"
    with pytest.raises(PhaseConfigError, match="PRETRAIN.BACKBONE_NORM = FrozenBN"):
        phase_config(cfg, "PRETRAIN", 8)
    cfg.DIRECT_PRETRAIN.PRETRAIN.BACKBONE_NORM = "BN"
    cfg.DIRECT_PRETRAIN.PRETRAIN.FREEZE_AT = 2
    with pytest.raises(PhaseConfigError, match="PRETRAIN.FREEZE_AT = 2"):
        phase_config(cfg, "PRETRAIN", 8)


def test_invalid_choices_name_the_key(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.FINETUNE.AUGMENTATION = "random_zoom"
    with pytest.raises(PhaseConfigError, match="FINETUNE.AUGMENTATION = 'random_zoom'"):
        phase_config(cfg, "FINETUNE", 8)
    cfg.DIRECT_PRETRAIN.PIPELINE = ["PRETRAIN", "PRETRIAN"]
    with pytest.raises(PhaseConfigError, match="unknown phase 'PRETRIAN'"):
        active_phases(cfg)


def test_single_phase_selection(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    assert active_phases(cfg) == ["PRETRAIN", "FINETUNE"]
    cfg.DIRECT_PRETRAIN.PHASE = "FINETUNE"
    assert active_phases(cfg) == ["FINETUNE"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_config_runs_on_cpu(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.MODEL.DEVICE = "cuda"
    cfg.DIRECT_PRETRAIN.FINETUNE.BACKBONE_NORM = "SyncBN"
    cfg.DIRECT_PRETRAIN.FINETUNE.FPN_NORM = "SyncBN"
    cfg.DIRECT_PRETRAIN.FINETUNE.AMP = True
    fine = phase_config(cfg, "FINETUNE", 8)
    assert fine.MODEL.DEVICE == "cpu"
    assert fine.MODEL.RESNETS.NORM == "naiveSyncBN" and fine.MODEL.FPN.NORM == "naiveSyncBN"
    assert not fine.SOLVER.AMP.ENABLED
