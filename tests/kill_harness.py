"""Run the tiny pipeline in this process and SIGKILL it at a chosen point (for test_resume).

Usage: python kill_harness.py OUTPUT_DIR DATA_JSON KILL_POINT [KEY VALUE ...]
  DATA_JSON: {"train": [json, images], "val": [json, images]}
  KILL_POINT: "none", "iter:PHASE:N" (before iteration N), "write:NAME" (half-way through
  writing the file NAME), "eval:PHASE" (during the phase's evaluation).
  KEY VALUE: config overrides (e.g. DATALOADER.NUM_WORKERS 2).
The kill points are test instrumentation applied here by patching; the library has none.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch

from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.utils import io as dp_io
from direct_pretrain.utils.logger import setup_project_logger

from conftest import tiny_cfg  # this script's folder (tests/) is on sys.path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill_point: str) -> None:
    kind, _, arg = kill_point.partition(":")
    if kind == "iter":
        phase, n = arg.split(":")
        run_step = DirectPretrainTrainer.run_step

        def run_step_then_die(self):
            if self.cfg.DIRECT_PRETRAIN.PHASE == phase and self.iter == int(n):
                die()
            run_step(self)

        DirectPretrainTrainer.run_step = run_step_then_die
    elif kind == "write":
        save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if arg not in getattr(f, "name", ""):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        dp_io.torch.save = half_save
    elif kind == "eval":
        test = DirectPretrainTrainer.test.__func__

        def test_then_die(cls, cfg, model, *args, **kwargs):
            if cfg.DIRECT_PRETRAIN.PHASE == arg:
                die()
            return test(cls, cfg, model, *args, **kwargs)

        DirectPretrainTrainer.test = classmethod(test_then_die)
    elif kind != "none":
        raise SystemExit(f"unknown kill point {kill_point}")


if __name__ == "__main__":
    out, data_json, kill_point, *overrides = sys.argv[1:]
    data = {k: tuple(v) for k, v in json.loads(Path(data_json).read_text()).items()}
    cfg = tiny_cfg(data, Path(out))
    for phase in ("PRETRAIN", "FINETUNE"):
        cfg.DIRECT_PRETRAIN[phase].MAX_ITER = 4
    cfg.merge_from_list(overrides)
    setup_project_logger(out)
    install(kill_point)
    run_pipeline(cfg)
