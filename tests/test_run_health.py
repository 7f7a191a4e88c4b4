"""Run folders that move, and phases that end with broken weights."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from detectron2.engine import HookBase

from direct_pretrain.bridge import BridgeError, bridge_checkpoint, unhealthy_weights
from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.pipeline import run_pipeline

from conftest import tiny_cfg


def test_a_moved_run_resumes_and_a_copied_finished_run_is_finished(
    synthetic_data, tmp_path, caplog
):
    first = tmp_path / "first"
    run_pipeline(tiny_cfg(synthetic_data, first))
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    with caplog.at_level(logging.INFO):
        run_pipeline(tiny_cfg(synthetic_data, copy))
    assert "Phase PRETRAIN: already finished in" in caplog.text
    assert "Phase FINETUNE: already finished in" in caplog.text

    (first / "finetune" / "phase_done.json").unlink()  # as if killed after its last checkpoint
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_pipeline(tiny_cfg(synthetic_data, moved))
    assert "Phase FINETUNE: resuming at iteration 2 of 2" in caplog.text
    assert (moved / "finetune" / "phase_done.json").is_file()


class _Explode(HookBase):
    """Scales every weight by 1e9 in the last iteration: finite, but far beyond training."""

    def after_step(self) -> None:
        if self.trainer.iter == self.trainer.max_iter - 1:
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    p.mul_(1e9)


def test_a_phase_with_exploded_weights_is_not_recorded_finished(
    synthetic_data, tmp_path, monkeypatch
):
    build_hooks = DirectPretrainTrainer.build_hooks
    monkeypatch.setattr(
        DirectPretrainTrainer, "build_hooks", lambda self: [_Explode(), *build_hooks(self)]
    )
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    message = r"phase PRETRAIN ended with broken weights \(values up to .* \(beyond 1e\+06\)"
    with pytest.raises(FloatingPointError, match=message) as error:
        run_pipeline(cfg)
    assert "DIRECT_PRETRAIN.PRETRAIN.BASE_LR" in str(error.value)
    assert not (tmp_path / "run" / "pretrain" / "phase_done.json").exists()
    monkeypatch.setattr(DirectPretrainTrainer, "build_hooks", build_hooks)
    with pytest.raises(FloatingPointError, match=message):  # a rerun says it again
        run_pipeline(cfg)


def test_the_bridge_refuses_broken_weights_naming_the_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    assert unhealthy_weights(model.state_dict()) == ""
    with torch.no_grad():
        model.bias[0] = float("nan")
    source = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, source)
    with pytest.raises(BridgeError, match=r"not bridging .*model_final.pth: .*non-finite .*bias"):
        bridge_checkpoint(source, torch.nn.Linear(2, 2), tmp_path / "bridged.pth")
    assert not (tmp_path / "bridged.pth").exists()


def test_a_last_phase_below_an_earlier_one_is_said_and_kept_in_the_summary(caplog):
    from direct_pretrain.outcome import worse_than_earlier

    phases = {"PRETRAIN": {"AP": 28.8}, "FINETUNE": {"AP": 21.8}}
    with caplog.at_level(logging.WARNING):
        warnings = worse_than_earlier(phases, ["scenes_val"])
    assert warnings == [caplog.records[-1].getMessage()]
    assert warnings[0].startswith(
        "The last phase, FINETUNE, ends below phase PRETRAIN on scenes_val: box AP 21.8 against "
        "28.8. model_final.pth is the FINETUNE model; the PRETRAIN model is "
        "pretrain/model_final.pth (predict.py --run OUTPUT_DIR --phase PRETRAIN)."
    )
    assert worse_than_earlier({"PRETRAIN": {"AP": 9.0}, "FINETUNE": {"AP": 12.0}}, ["v"]) == []
    assert worse_than_earlier({"PRETRAIN": {"AP": 9.0}, "FINETUNE": {"AP": None}}, ["v"]) == []
