"""Every shipped config loads, resolves each of its phases and builds each phase's model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from direct_pretrain import get_cfg
from direct_pretrain.config import model_zoo_path
from direct_pretrain.phases import active_phases, phase_config
from direct_pretrain.trainer import DirectPretrainTrainer

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_and_builds(path: Path):
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    for phase in active_phases(cfg):
        pcfg = phase_config(cfg, phase, num_train_images=1000)
        assert pcfg.SOLVER.MAX_ITER > 0
        model = DirectPretrainTrainer.build_model(pcfg)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_model_zoo_base_resolves():
    assert model_zoo_path("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml").endswith(".yaml")
    with pytest.raises(FileNotFoundError, match="not in Detectron2's model zoo"):
        model_zoo_path("COCO-Detection/no_such_model.yaml")


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("DIRECT_PRETRAIN:\n  PRETRAIN:\n    BASE_LRR: 0.1\n")
    with pytest.raises(KeyError, match="DIRECT_PRETRAIN.PRETRAIN.BASE_LRR"):
        get_cfg().merge_from_file(str(bad))
    with pytest.raises(ValueError, match="DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH"):
        get_cfg().merge_from_list(["DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH", "many"])
