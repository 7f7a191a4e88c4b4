"""SIGTERM, SIGINT and SIGUSR1 stop a run after the current iteration with a checkpoint and a
line in log.txt; the same command continues it; several processes stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from detectron2.engine import HookBase
from detectron2.utils import comm
from test_rank_failures import _exit, _launch, _outcomes

from direct_pretrain.engine import DirectPretrainTrainer, StopRequested

from conftest import ROOT, skip_without_cpu_multiprocess, tiny_cfg, write_config


def _run_and_signal(config: Path, line: str, signum: int) -> tuple[int, str]:
    """Run train_net.py on ``config``, send ``signum`` 2 s after ``line`` appears in its log;
    return its exit code and console output."""
    log = Path(yaml.safe_load(config.read_text())["OUTPUT_DIR"]) / "log.txt"
    console = config.with_suffix(f".{signum}.out")
    with open(console, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "train_net.py", "--config-file", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while not (log.is_file() and line in log.read_text()):
            assert proc.poll() is None, console.read_text()[-3000:]
            assert time.time() < deadline, "the line never came"
            time.sleep(0.2)
        time.sleep(2.0)
        proc.send_signal(signum)
        proc.wait(timeout=300)
    return proc.returncode, console.read_text()


def _saved_iteration(phase_dir: Path) -> int:
    name = (phase_dir / "last_checkpoint").read_text().strip()
    return torch.load(phase_dir / name, map_location="cpu", weights_only=False)["iteration"]


def test_sigterm_then_sigint_stop_with_a_checkpoint_and_the_rerun_resumes(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    node = cfg.DIRECT_PRETRAIN.PRETRAIN
    node.MAX_ITER, node.CHECKPOINT_PERIOD = 5000, 100000  # only the stop writes a checkpoint
    config = write_config(cfg, tmp_path / "config.yaml")
    log, phase_dir = tmp_path / "run" / "log.txt", tmp_path / "run" / "pretrain"

    code, output = _run_and_signal(config, "Phase PRETRAIN: starting", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    first = _saved_iteration(phase_dir)
    stopped = f"Stopped by SIGTERM at iteration {first + 1} of 5000; rerun the same command"
    assert stopped in log.read_text() and stopped in output
    assert "Traceback" not in output

    resuming = f"resuming at iteration {first + 1} of 5000"
    code, output = _run_and_signal(config, resuming, signal.SIGINT)
    assert code == 128 + signal.SIGINT, output[-3000:]
    second = _saved_iteration(phase_dir)
    assert second > first
    assert f"Stopped by SIGINT at iteration {second + 1} of 5000" in log.read_text()
    assert "KeyboardInterrupt" not in output


class _SignalMainAt(HookBase):
    """Sends SIGTERM to the main process only, during iteration ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self) -> None:
        if self.trainer.iter == self.n and comm.is_main_process():
            os.kill(os.getpid(), signal.SIGTERM)


def _stop_worker(cfg, folder: str) -> None:
    from direct_pretrain.pipeline import run_pipeline

    build_hooks = DirectPretrainTrainer.build_hooks
    DirectPretrainTrainer.build_hooks = lambda self: [_SignalMainAt(1), *build_hooks(self)]
    try:
        outcome = f"returned {run_pipeline(cfg)!r}"
    except StopRequested as e:
        outcome = f"StopRequested: {e}"
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{comm.get_rank()}.txt").write_text(outcome)
    _exit()


def test_a_signal_on_one_process_stops_every_process_at_the_same_iteration(
    synthetic_data, tmp_path
):
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    node = cfg.DIRECT_PRETRAIN.PRETRAIN
    node.MAX_ITER, node.IMS_PER_BATCH, node.CHECKPOINT_PERIOD = 10, 4, 100
    _launch(_stop_worker, cfg, str(tmp_path / "outcome"))

    expected = "StopRequested: Stopped by SIGTERM at iteration 2 of 10; rerun the same command"
    assert all(o.startswith(expected) for o in _outcomes(tmp_path / "outcome"))
    assert _saved_iteration(tmp_path / "run" / "pretrain") == 1
