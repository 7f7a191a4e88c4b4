"""Every shipped config trains: two iterations of each phase and the bridge between them."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, shrink

from direct_pretrain import get_cfg
from direct_pretrain.pipeline import run_pipeline

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("Base-"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_trains_each_phase(path, synthetic_data, tmp_path):
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    summary = run_pipeline(shrink(cfg, synthetic_data, tmp_path))
    assert list(summary["phases"]) == list(cfg.DIRECT_PRETRAIN.PIPELINE)
    for phase in cfg.DIRECT_PRETRAIN.PIPELINE:
        folder = tmp_path / phase.lower()
        assert json.loads((folder / "phase_done.json").read_text())["iterations"] == 2
        if cfg.DIRECT_PRETRAIN[phase].INIT == "previous":
            report = json.loads((folder / "bridged_init_report.json").read_text())
            assert report["loaded"] and not report["reinitialised"]
    if cfg.MODEL.MASK_ON:
        assert "segm" in json.loads((tmp_path / "finetune" / "phase_done.json").read_text())[
            "results"]
