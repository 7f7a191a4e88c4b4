"""Every shipped config trains: two iterations of each phase and the bridge between them."""

from __future__ import annotations

import json
import shutil

import pytest

from direct_pretrain.config_systems import load_config
from direct_pretrain.pipeline import run_pipeline

from conftest import shrink
from test_configs import CONFIGS, config_id


@pytest.fixture
def run_dir(tmp_path):
    """An output folder removed after the test: R-50 checkpoints take ~0.3 GB each."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_trains_each_phase(path, synthetic_data, run_dir):
    cfg = load_config(str(path))
    summary = run_pipeline(shrink(cfg, synthetic_data, run_dir))
    assert list(summary["phases"]) == list(cfg.DIRECT_PRETRAIN.PIPELINE)
    for phase in cfg.DIRECT_PRETRAIN.PIPELINE:
        folder = run_dir / phase.lower()
        done = json.loads((folder / "phase_done.json").read_text())
        assert done["iterations"] == 2
        assert list(folder.glob("events.out.tfevents.*")), f"no TensorBoard events in {folder}"
        assert ("bbox" in done["results"]) == (phase != "BOX_DOMAIN")  # no classifier there
        if cfg.DIRECT_PRETRAIN[phase].INIT == "previous":
            report = json.loads((folder / "bridged_init_report.json").read_text())
            # Only what INIT_KEYS leaves out, or the box-domain prediction layers, start anew.
            assert report["loaded"] and all(
                why.startswith(("not selected by", "dropped by request"))
                for why in report["reinitialised"].values()
            )
    masks = (
        json.dumps(summary).count("segm")
        or "segm" in json.loads((run_dir / "finetune" / "phase_done.json").read_text())["results"]
    )
    assert bool(masks) == ("mask" in path.name)
