"""Every shipped config trains: two iterations of each phase and the bridge between them."""

from __future__ import annotations

import json

import pytest
from conftest import shrink
from test_configs import CONFIGS, config_id

from direct_pretrain.config import load_config
from direct_pretrain.pipeline import run_pipeline


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_trains_each_phase(path, synthetic_data, tmp_path):
    cfg = load_config(str(path))
    summary = run_pipeline(shrink(cfg, synthetic_data, tmp_path))
    assert list(summary["phases"]) == list(cfg.DIRECT_PRETRAIN.PIPELINE)
    for phase in cfg.DIRECT_PRETRAIN.PIPELINE:
        folder = tmp_path / phase.lower()
        done = json.loads((folder / "phase_done.json").read_text())
        assert done["iterations"] == 2
        assert ("bbox" in done["results"]) == (phase != "BOX_DOMAIN")  # no classifier there
        if cfg.DIRECT_PRETRAIN[phase].INIT == "previous":
            report = json.loads((folder / "bridged_init_report.json").read_text())
            # Only what INIT_KEYS leaves out, or the box-domain prediction layers, start anew.
            assert report["loaded"] and all(
                why.startswith(("not selected by", "dropped by request"))
                for why in report["reinitialised"].values())
    masks = json.dumps(summary).count("segm") or "segm" in json.loads(
        (tmp_path / "finetune" / "phase_done.json").read_text())["results"]
    assert bool(masks) == ("mask" in path.name)
