"""A failure on one process of a 2-process run (gloo, CPU) stops every process with the error.

Each worker records what it returned or raised in ``rank<N>.txt`` instead of raising: torch's
spawn kills the other processes as soon as one fails, which would hide a process left waiting.
Collectives time out after a minute, so a regression fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, launch
from detectron2.utils import comm

from direct_pretrain.checkpoint import SafeCheckpointer
from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.utils.dist import build_on_main

from conftest import skip_without_cpu_multiprocess, tiny_cfg

TIMEOUT = datetime.timedelta(seconds=60)


def _record(folder: Path, fn: Callable) -> None:
    """Write ``returned <value>`` or ``<Error>: <message>`` of ``fn()`` for this rank."""
    try:
        outcome = f"returned {fn()!r}"
    except Exception as e:  # noqa: BLE001 - the outcome is the result
        outcome = f"{type(e).__name__}: {e}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{comm.get_rank()}.txt").write_text(outcome)


def _outcomes(folder: Path) -> list[str]:
    return [(folder / f"rank{rank}.txt").read_text() for rank in (0, 1)]


def _exit() -> None:
    """End a worker process once its outcome is written. Without Python's finalisation: gloo
    threads still referenced then (detectron2 keeps its local process group) can abort the
    process (seen once, on a loaded machine), which would fail a test whose outcome is in."""
    dist.destroy_process_group()
    os._exit(0)


def _launch(worker: Callable, *args) -> None:
    launch(worker, 2, dist_url="auto", args=args, timeout=TIMEOUT)


def _build_on_main_worker(folder: str) -> None:
    folder, rank = Path(folder), comm.get_rank()

    def build() -> str:  # the main process writes the cache slowly; the others read it
        with open(folder / "build_calls.txt", "a") as f:
            f.write(f"{rank} ")
        if rank == 0:
            time.sleep(1.0)
            (folder / "cache.txt").write_text("stats")
        return (folder / "cache.txt").read_text()

    def fail() -> str:
        with open(folder / "fail_calls.txt", "a") as f:
            f.write(f"{rank} ")
        raise OSError(f"disk full (rank {rank})")

    _record(folder / "build", lambda: build_on_main(build, "the test cache"))
    _record(folder / "fail", lambda: build_on_main(fail, "the test cache"))
    _exit()


def test_build_on_main_runs_main_first_and_shares_its_failure(tmp_path):
    skip_without_cpu_multiprocess(ddp=False)
    _launch(_build_on_main_worker, str(tmp_path))

    assert _outcomes(tmp_path / "build") == ["returned 'stats'"] * 2
    assert (tmp_path / "build_calls.txt").read_text() == "0 1 "  # rank 1 after rank 0 ended
    assert _outcomes(tmp_path / "fail") == [
        "OSError: disk full (rank 0)",
        "MainProcessError: the test cache failed on the main process: OSError: disk full "
        "(rank 0)",
    ]
    assert (tmp_path / "fail_calls.txt").read_text() == "0 "


def _pipeline_worker(cfg, folder: str) -> None:
    _record(Path(folder), lambda: run_pipeline(cfg) and "finished")
    _exit()


def test_pixel_stats_failing_on_main_stop_every_process(synthetic_data, tmp_path):
    skip_without_cpu_multiprocess(ddp=False)
    images = tmp_path / "images"
    shutil.copytree(synthetic_data["train"][1], images)
    (images / "img003.png").write_bytes(b"not an image")
    data = {**synthetic_data, "train": (synthetic_data["train"][0], str(images))}
    cfg = tiny_cfg(data, tmp_path / "run")
    cfg.DIRECT_PRETRAIN.PIXEL_STATS = "dataset"
    _launch(_pipeline_worker, cfg, str(tmp_path / "outcome"))

    main, other = _outcomes(tmp_path / "outcome")
    assert main.startswith("BadImageError: pixel statistics:") and "img003.png" in main
    assert other.startswith("MainProcessError: pixel statistics failed on the main process: ")
    assert "img003.png" in other


def _checkpoint_worker(folder: str) -> None:
    folder = Path(folder)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    checkpointer = SafeCheckpointer(model, str(folder / "out"))
    _record(folder / "finite", lambda: checkpointer.save("model_0000000"))
    if comm.is_main_process():
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    _record(folder / "diverged", lambda: checkpointer.save("model_0000001"))
    _exit()


def test_checkpoint_of_weights_non_finite_on_one_process_fails_on_all(tmp_path):
    skip_without_cpu_multiprocess(ddp=False)
    _launch(_checkpoint_worker, str(tmp_path))

    assert _outcomes(tmp_path / "finite") == ["returned None"] * 2
    assert (
        _outcomes(tmp_path / "diverged")
        == [
            "FloatingPointError: not saving checkpoint 'model_0000001': non-finite weights in "
            "['weight'] (1 tensors) on process(es) [0]; training has diverged"
        ]
        * 2
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "last_checkpoint",
        "model_0000000.pth",
        "model_0000000.pth.sha256",
    ]


class _PoisonMainAfter(HookBase):
    """Makes the main process's weights NaN after iteration ``n`` (only there: DDP keeps the
    other process's copy finite)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self) -> None:
        if self.trainer.iter == self.n and comm.is_main_process():
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    p.fill_(float("nan"))


def _diverging_worker(cfg, folder: str) -> None:
    build_hooks = DirectPretrainTrainer.build_hooks
    DirectPretrainTrainer.build_hooks = lambda self: [_PoisonMainAfter(1), *build_hooks(self)]
    _pipeline_worker(cfg, folder)


def test_training_diverged_on_main_stops_every_process(synthetic_data, tmp_path):
    """The checkpoint hook runs on every process, where the main process has it."""
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    cfg.DIRECT_PRETRAIN.PRETRAIN.MAX_ITER = 3
    cfg.DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH = 4  # 2 images per process
    _launch(_diverging_worker, cfg, str(tmp_path / "outcome"))

    for outcome in _outcomes(tmp_path / "outcome"):
        assert outcome.startswith(
            "FloatingPointError: phase PRETRAIN: training diverged at iteration 1 (not saving "
            "checkpoint 'model_0000001'"
        ), outcome
        assert "on process(es) [0]" in outcome
    assert (tmp_path / "run" / "pretrain" / "last_checkpoint").read_text() == "model_0000000.pth"


class _PoisonOtherAt(HookBase):
    """Makes the weights of process 1 (not the main one) NaN before iteration ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def before_step(self) -> None:
        if self.trainer.iter == self.n and comm.get_rank() == 1:
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    p.fill_(float("nan"))


def _nan_on_other_worker(cfg, folder: str) -> None:
    build_hooks = DirectPretrainTrainer.build_hooks
    DirectPretrainTrainer.build_hooks = lambda self: [_PoisonOtherAt(1), *build_hooks(self)]
    _pipeline_worker(cfg, folder)


def test_nan_loss_on_one_other_process_stops_every_process_together(synthetic_data, tmp_path):
    """Detectron2 checks the loss on the main process only: a NaN elsewhere must not leave the
    main process waiting in the next all-reduce."""
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    node = cfg.DIRECT_PRETRAIN.PRETRAIN
    node.MAX_ITER, node.IMS_PER_BATCH, node.CHECKPOINT_PERIOD = 3, 4, 100
    _launch(_nan_on_other_worker, cfg, str(tmp_path / "outcome"))

    outcomes = _outcomes(tmp_path / "outcome")
    for outcome in outcomes:  # process 1: its own error (a NaN loss, or NaN boxes in the model)
        assert outcome.startswith(
            "FloatingPointError: phase PRETRAIN: training diverged at iteration 1 ("
        ), outcomes
    assert "Training diverged at iteration=1: " in outcomes[0]
    assert "on process(es) [1]" in outcomes[0]
