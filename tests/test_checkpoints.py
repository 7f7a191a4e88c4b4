"""Checked checkpoints: a damaged one is set aside and the phase resumes from the one before."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from direct_pretrain.checkpoint import checksum_path, file_sha256
from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.pipeline import PhaseStateError, run_pipeline

from conftest import tiny_cfg


class Interrupted(Exception):
    """Stands for a run killed before an iteration."""


def _pretrain_cfg(synthetic_data, out: Path, cache: Path, phase: str = "PRETRAIN"):
    cfg = tiny_cfg(synthetic_data, out, cache)
    cfg.DIRECT_PRETRAIN.PHASE = phase
    cfg.DIRECT_PRETRAIN.PRETRAIN.MAX_ITER = 3
    return cfg


@pytest.fixture(scope="module")
def interrupted(synthetic_data, tmp_path_factory) -> tuple[Path, Path]:
    """A run folder whose phase PRETRAIN (3 iterations, a checkpoint after each) stopped
    before iteration 2, and the shared cache folder."""
    root = tmp_path_factory.mktemp("interrupted")
    run_step = DirectPretrainTrainer.run_step

    def stop_at_2(self):
        if self.iter == 2:
            raise Interrupted
        run_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DirectPretrainTrainer, "run_step", stop_at_2)
        with pytest.raises(Interrupted):
            run_pipeline(_pretrain_cfg(synthetic_data, root / "run", root / "cache"))
    return root / "run", root / "cache"


@pytest.fixture
def log(caplog):
    """The project's log records (its logger does not propagate once set up)."""
    logger = logging.getLogger("direct_pretrain")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, "direct_pretrain")
    yield caplog
    logger.removeHandler(caplog.handler)


def _copy(interrupted, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted[0], out)
    return out


def _damage(path: Path, offset: int) -> None:
    """Overwrite 1 KB of ``path`` at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * 4)


def _warnings(log) -> str:
    return "\n".join(r.getMessage() for r in log.records if r.levelno >= logging.WARNING)


def _finished_finite(folder: Path) -> None:
    assert (folder / "phase_done.json").is_file()
    assert (folder / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(folder / "model_final.pth", weights_only=True)
    assert all(v.isfinite().all() for v in final["model"].values() if v.is_floating_point())
    assert (
        file_sha256(folder / "model_final.pth")
        in checksum_path(folder / "model_final.pth").read_text()
    )


@pytest.mark.parametrize("where", ["middle", "start"])
def test_damaged_last_checkpoint_is_set_aside(synthetic_data, interrupted, tmp_path, log, where):
    out = _copy(interrupted, tmp_path)
    pre = out / "pretrain"
    last = pre / "model_0000001.pth"
    assert (pre / "last_checkpoint").read_text() == last.name
    original = last.read_bytes()
    _damage(last, len(original) // 2 if where == "middle" else 64)

    run_pipeline(_pretrain_cfg(synthetic_data, out, interrupted[1]))

    warnings = _warnings(log)
    assert f"checkpoint '{last}' is damaged" in warnings
    assert f"Resuming from {pre / 'model_0000000.pth'}, the newest good checkpoint" in warnings
    assert "Phase PRETRAIN: resuming at iteration 1 of 3" in log.text
    aside = pre / "model_0000001.pth.damaged"
    assert aside.read_bytes() != original and len(aside.read_bytes()) == len(original)
    assert checksum_path(aside).is_file()  # its record goes with it
    _finished_finite(pre)


def test_no_good_checkpoint_restarts_the_phase(synthetic_data, interrupted, tmp_path, log):
    out = _copy(interrupted, tmp_path)
    pre = out / "pretrain"
    for name in ("model_0000000.pth", "model_0000001.pth"):
        _damage(pre / name, 100)

    run_pipeline(_pretrain_cfg(synthetic_data, out, interrupted[1]))

    assert (
        f"No good checkpoint is left in {pre} (model_0000001.pth -> model_0000001.pth.damaged, "
        "model_0000000.pth -> model_0000000.pth.damaged): the phase restarts from its initial "
        "weights." in _warnings(log)
    )
    assert "Phase PRETRAIN: starting, 3 iterations" in log.text
    assert (pre / "model_0000000.pth.damaged").is_file()
    _finished_finite(pre)


def test_checkpoint_without_recorded_checksum_loads(synthetic_data, interrupted, tmp_path, log):
    out = _copy(interrupted, tmp_path)
    pre = out / "pretrain"
    checksum_path(pre / "model_0000001.pth").unlink()  # as written before checksums

    run_pipeline(_pretrain_cfg(synthetic_data, out, interrupted[1]))

    assert (
        f"{pre / 'model_0000001.pth'} has no recorded checksum: loading it unchecked." in log.text
    )
    assert "Phase PRETRAIN: resuming at iteration 2 of 3" in log.text
    assert "damaged" not in _warnings(log)
    assert not list(pre.glob("*.damaged"))
    _finished_finite(pre)


def test_damaged_final_model_stops_the_bridge(synthetic_data, tmp_path, log):
    out, cache = tmp_path / "run", tmp_path / "cache"
    run_pipeline(_pretrain_cfg(synthetic_data, out, cache))
    pre = out / "pretrain"
    final = pre / "model_final.pth"
    _damage(final, final.stat().st_size // 2)

    with pytest.raises(PhaseStateError) as error:
        run_pipeline(_pretrain_cfg(synthetic_data, out, cache, phase="FINETUNE"))
    message = str(error.value)
    assert f"checkpoint '{final}' is damaged" in message
    assert f"delete {pre / 'phase_done.json'} and run phase PRETRAIN again" in message
    assert not (out / "finetune" / "bridged_init.pth").exists()

    # Following the advice: the phase resumes after its last iteration and writes it again.
    (pre / "phase_done.json").unlink()
    run_pipeline(_pretrain_cfg(synthetic_data, out, cache, phase=""))
    assert "Phase PRETRAIN: resuming at iteration 3 of 3" in log.text
    assert (pre / "model_final.pth.damaged").is_file()
    assert torch.load(final, weights_only=True)["iteration"] == 2  # from model_0000002.pth
    _finished_finite(pre)
    assert (out / "finetune" / "phase_done.json").is_file()
