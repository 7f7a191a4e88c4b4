"""A run killed (SIGKILL) in each phase and rerun ends with the weights and APs of the same run
uninterrupted, bit for bit on CPU (data order, augmentations and the model's random draws)."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).with_name("kill_harness.py")
PHASES = ("PRETRAIN", "FINETUNE")


def _run(out: Path, data_json: Path, kill_point: str, workers: int) -> int:
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(out), str(data_json), kill_point]
        + ["DATALOADER.NUM_WORKERS", str(workers)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{kill_point}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.returncode


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    for phase in PHASES:
        a = torch.load(resumed / phase.lower() / "model_final.pth", weights_only=True)["model"]
        b = torch.load(uninterrupted / phase.lower() / "model_final.pth", weights_only=True)
        b = b["model"]
        differ = [k for k in b if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not differ, f"{phase}: {len(differ)} tensors differ"
    summaries = [json.loads((o / "summary.json").read_text()) for o in (resumed, uninterrupted)]
    for phase in PHASES:
        a, b = (s["phases"][phase] for s in summaries)
        assert {k: a[k] for k in ("AP", "AP50", "AP75")} == {
            k: b[k] for k in ("AP", "AP50", "AP75")
        }
    assert _digest(resumed / "model_final.pth") == _digest(uninterrupted / "model_final.pth")


@pytest.fixture(scope="module")
def data_json(synthetic_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("identical") / "data.json"
    path.write_text(json.dumps(synthetic_data))
    return path


@pytest.fixture(scope="module")
def uninterrupted(data_json) -> dict[int, Path]:
    """The uninterrupted run's folder, per number of loader workers (run on first use)."""
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            runs[workers] = data_json.parent / f"uninterrupted_{workers}"
            assert _run(runs[workers], data_json, "none", workers) == 0
        return runs[workers]

    return get


@pytest.mark.parametrize("workers, seed", [(0, 5), (2, 7)])
def test_killed_in_each_phase_ends_as_uninterrupted(
    data_json, uninterrupted, tmp_path, workers, seed
):
    rng = random.Random(seed)
    kills = [rng.randrange(1, 4) for _ in PHASES]  # before iteration N of 4 (after N checkpoints)
    out = tmp_path / "run"
    for phase, n in zip(PHASES, kills):
        assert _run(out, data_json, f"iter:{phase}:{n}", workers) == -signal.SIGKILL, (phase, n)
    assert _run(out, data_json, "none", workers) == 0
    _assert_same_run(out, uninterrupted(workers))
