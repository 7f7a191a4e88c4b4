"""Every shipped config (yacs and LazyConfig) loads, resolves each phase and builds its model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from detectron2.config import instantiate
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock
from omegaconf import DictConfig

from direct_pretrain import get_cfg
from direct_pretrain.config import model_zoo_path
from direct_pretrain.config_systems import load_config, system_of
from direct_pretrain.phases import active_phases
from direct_pretrain.utils.errors import EXIT_STATUS

from conftest import ROOT

# Runnable configs; Base-*.yaml and common/*.py are pieces other configs inherit.
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*")
    if p.suffix in (".yaml", ".py") and not p.name.startswith("Base-") and "common" not in p.parts
)


def config_id(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def test_configs_are_shipped():
    assert sum(p.suffix == ".yaml" for p in CONFIGS) >= 12
    assert sum(p.suffix == ".py" for p in CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_loads_and_builds(path: Path):
    cfg = load_config(str(path))
    kind = system_of(cfg)
    for phase in active_phases(cfg):
        pcfg = kind.phase_config(cfg, phase, num_images=1000)
        assert pcfg.DIRECT_PRETRAIN.PHASE == phase
        model = kind.build_model(pcfg, on_cpu=True)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_model_zoo_base_resolves():
    assert model_zoo_path("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml").endswith(".yaml")
    with pytest.raises(FileNotFoundError, match="not in Detectron2's model zoo"):
        model_zoo_path("COCO-Detection/no_such_model.yaml")


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("DIRECT_PRETRAIN:\n  PRETRAIN:\n    BASE_LRR: 0.1\n")
    with pytest.raises(KeyError, match="DIRECT_PRETRAIN.PRETRAIN.BASE_LRR"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH"):
        get_cfg().merge_from_list(["DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH", "many"])
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))


def test_train_net_stops_on_a_refused_setting_with_its_reason_and_no_traceback(tmp_path):
    demo = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml")
    for opts, reason in (
        (["DIRECT_PRETRAIN.PRETRAIN.BASE_LRR", "0.1"], "ConfigError: "),  # yacs: a KeyError
        (["DIRECT_PRETRAIN.PIPELINE", "['FOO']"], "PhaseConfigError: "),  # the project's own
    ):
        result = subprocess.run(
            [sys.executable, "train_net.py", "--config-file", demo, "OUTPUT_DIR", str(tmp_path)]
            + opts,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == EXIT_STATUS, result.stderr[-2000:]
        assert f"Stopped: {reason}" in result.stderr and opts[0].split(".")[-1] in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


LAZY_DEMO = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.py")


def test_lazy_overrides_are_checked():
    cfg = load_config(LAZY_DEMO, ["DIRECT_PRETRAIN.PRETRAIN.EPOCHS=12", "train.log_period=7"])
    assert cfg.DIRECT_PRETRAIN.PRETRAIN.EPOCHS == 12 and cfg.train.log_period == 7
    with pytest.raises(KeyError, match="Non-existent config key: train.max_itr"):
        load_config(LAZY_DEMO, ["train.max_itr=3"])
    with pytest.raises(KeyError, match="DIRECT_PRETRAIN.PRETRAIN.BASE_LRR"):
        load_config(LAZY_DEMO, ["+DIRECT_PRETRAIN.PRETRAIN.BASE_LRR=0.1"])
    with pytest.raises(ValueError, match="DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH: 'many'"):
        load_config(LAZY_DEMO, ["DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH=many"])


# The COCO recipes with a bottleneck ResNet (R-18 has basic blocks; Swin-T none).
RESNET_RECIPES = [
    p for p in CONFIGS if "COCO" in p.parts and not any(s in p.name for s in ("R_18", "swin"))
]


@pytest.mark.parametrize("path", RESNET_RECIPES, ids=config_id)
def test_recipe_resnet_strides_in_the_3x3_conv(path: Path):
    """The paper's torchvision-style ResNet, not Detectron2's default (stride in the 1x1)."""
    cfg = load_config(str(path))
    pcfg = system_of(cfg).phase_config(cfg, active_phases(cfg)[0], num_images=1000)
    if isinstance(pcfg, DictConfig):
        backbone = instantiate(pcfg.model.backbone.bottom_up)
    else:
        backbone = build_backbone(pcfg)
    strided = [b for b in backbone.modules() if isinstance(b, BottleneckBlock) and b.stride == 2]
    assert len(strided) == 3, f"{path.name}: expected res3-res5 to start with a strided block"
    for block in strided:
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2), path.name
