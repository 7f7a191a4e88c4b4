"""Kill the pipeline (SIGKILL) at several points; rerunning the same command finishes it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

HARNESS = Path(__file__).with_name("kill_harness.py")


OUTPUT: dict[str, str] = {}  # kill point -> what the run printed


def _run(out: Path, data_json: Path, kill_point: str) -> int:
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(out), str(data_json), kill_point],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{kill_point}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    OUTPUT[kill_point] = proc.stdout + proc.stderr
    return proc.returncode


def _last(folder: Path) -> str:
    return (folder / "last_checkpoint").read_text()


def test_kill_anywhere_then_rerun(synthetic_data, tmp_path):
    data_json = tmp_path / "data.json"
    data_json.write_text(json.dumps(synthetic_data))
    out = tmp_path / "run"
    pre, fine = out / "pretrain", out / "finetune"

    assert _run(out, data_json, "iter:PRETRAIN:2") == -signal.SIGKILL
    assert _last(pre) == "model_0000001.pth" and not (pre / "phase_done.json").exists()

    # Killed half-way through writing the checkpoint after iteration 3 (model_0000002 is
    # written after the resumed iteration 2): the previous checkpoint stays the last one.
    assert _run(out, data_json, "write:model_0000002.pth") == -signal.SIGKILL
    assert "Phase PRETRAIN: resuming at iteration 2 of 4" in OUTPUT["write:model_0000002.pth"]
    assert _last(pre) == "model_0000001.pth" and not (pre / "model_0000002.pth").exists()
    assert torch.load(pre / "model_0000001.pth", weights_only=True)["iteration"] == 1

    assert _run(out, data_json, "write:bridged_init.pth") == -signal.SIGKILL
    assert (pre / "phase_done.json").is_file() and not (fine / "bridged_init.pth").exists()

    assert _run(out, data_json, "iter:FINETUNE:2") == -signal.SIGKILL
    assert (fine / "bridged_init.pth").is_file() and _last(fine) == "model_0000001.pth"

    assert _run(out, data_json, "eval:FINETUNE") == -signal.SIGKILL
    assert _last(fine) == "model_final.pth" and not (fine / "phase_done.json").exists()

    assert _run(out, data_json, "none") == 0
    assert "Phase PRETRAIN: already finished in" in OUTPUT["none"]
    assert "Phase FINETUNE: resuming at iteration 2 of 4" in (out / "log.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for phase, folder in (("PRETRAIN", pre), ("FINETUNE", fine)):
        done = json.loads((folder / "phase_done.json").read_text())
        assert done["iterations"] == 4 and summary["phases"][phase]["iterations"] == 4
        final = torch.load(folder / "model_final.pth", weights_only=True)
        assert final["trainer"]["iteration"] == 3  # every iteration done, none twice at the end
        assert "AP" in done["results"]["bbox"]
        assert not list(folder.glob(".*.tmp")), "partial files are cleaned up"
    assert (out / "model_final.pth").is_file()

    # The pre-train phase was not redone after it finished: its final model is older than
    # the bridge that was made from it.
    assert (pre / "model_final.pth").stat().st_mtime <= (fine / "bridged_init.pth").stat().st_mtime
