"""The tiny pipeline with 2 CPU processes (Detectron2's launch, gloo backend)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml
from detectron2.engine import HookBase, launch
from detectron2.utils import comm

from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.utils.errors import EXIT_STATUS

from conftest import ROOT, fake_calibration, skip_without_cpu_multiprocess, tiny_cfg

NORM = "backbone.bottom_up.stem.conv1.norm"


class _SaveNormStats(HookBase):
    """Saves this process's statistics of one BN layer at the end of the phase."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def after_train(self) -> None:
        model = self.trainer.model
        model = model.module if hasattr(model, "module") else model
        layer = dict(model.named_modules())[NORM]
        phase = self.trainer.cfg.DIRECT_PRETRAIN.PHASE
        torch.save(
            {"mean": layer.running_mean.clone(), "type": type(layer).__name__},
            f"{self.folder}/{phase}_rank{comm.get_rank()}.pt",
        )


def _worker(cfg, folder: str) -> None:
    build_hooks = DirectPretrainTrainer.build_hooks
    DirectPretrainTrainer.build_hooks = lambda self: [*build_hooks(self), _SaveNormStats(folder)]
    run_pipeline(cfg)
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_processes_sync_bn_only_where_the_phase_says(synthetic_data, tmp_path):
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    for phase in ("PRETRAIN", "FINETUNE"):
        cfg.DIRECT_PRETRAIN[phase].MAX_ITER = 3
        cfg.DIRECT_PRETRAIN[phase].IMS_PER_BATCH = 4  # 2 images per process
    cfg.DIRECT_PRETRAIN.PRETRAIN.BACKBONE_NORM = "BN"  # per-process statistics
    cfg.DIRECT_PRETRAIN.FINETUNE.BACKBONE_NORM = "SyncBN"  # naiveSyncBN on CPU
    launch(_worker, 2, dist_url="auto", args=(cfg, str(tmp_path)))

    stats = {
        (p, r): torch.load(tmp_path / f"{p}_rank{r}.pt", weights_only=True)
        for p in ("PRETRAIN", "FINETUNE")
        for r in (0, 1)
    }
    assert stats["PRETRAIN", 0]["type"] == "BatchNorm2d"
    assert not torch.allclose(stats["PRETRAIN", 0]["mean"], stats["PRETRAIN", 1]["mean"])
    assert stats["FINETUNE", 0]["type"] == "NaiveSyncBatchNorm"
    torch.testing.assert_close(stats["FINETUNE", 0]["mean"], stats["FINETUNE", 1]["mean"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["phases"]["FINETUNE"]["iterations"] == 3
    assert (tmp_path / "run" / "finetune" / "bridged_init_report.json").is_file()


def _budgeted_worker(cfg) -> None:
    run_pipeline(cfg, user_keys={})
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_processes_plan_in_step_and_keep_the_main_process_plan(synthetic_data, tmp_path):
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.1
    launch(_budgeted_worker, 2, dist_url="auto", args=(cfg,))
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    keys = json.loads((tmp_path / "finetune" / "phase_keys.json").read_text())
    epochs = plan["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    for replanned in plan.get("replanned", {}).values():
        epochs = replanned["values"].get("DIRECT_PRETRAIN.FINETUNE.EPOCHS", epochs)
    assert keys["DIRECT_PRETRAIN.FINETUNE.EPOCHS"] == epochs
    assert json.loads((tmp_path / "summary.json").read_text())["budget"]["minutes"] == 0.1


def _slow_machine_worker(cfg) -> None:
    """A budgeted run whose calibration says 10 ms per iteration (20 ms on process 1)."""
    import functools

    from direct_pretrain import pipeline
    from direct_pretrain.planning import planned_config

    calibrate = fake_calibration(0.01 * (1 + comm.get_rank()))
    pipeline.planned_config = functools.partial(planned_config, calibrate=calibrate)
    run_pipeline(cfg, user_keys={})
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_processes_keep_pace_together(synthetic_data, tmp_path):
    """The machine is far slower than calibrated: both processes stop at the main process's
    iteration and resume with its re-planned length."""
    skip_without_cpu_multiprocess(ddp=True)
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.2
    launch(_slow_machine_worker, 2, dist_url="auto", args=(cfg,))
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["calibration"]["PRETRAIN"]["seconds_per_iter"] == 0.01  # the main process's
    iterations = plan["paced"]["PRETRAIN"][-1]["values"]["DIRECT_PRETRAIN.PRETRAIN.MAX_ITER"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["PRETRAIN"]["iterations"] == iterations < 100


def test_a_refusal_in_two_processes_stops_both_with_its_reason_once_and_no_traceback(tmp_path):
    skip_without_cpu_multiprocess(ddp=False)
    demo = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml")
    result = subprocess.run(
        [sys.executable, "train_net.py", "--num-gpus", "2", "--config-file", demo]
        + ["OUTPUT_DIR", str(tmp_path), "DIRECT_PRETRAIN.PIPELINE", "['FOO']"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_STATUS, output[-3000:]
    assert output.count("Stopped: PhaseConfigError: DIRECT_PRETRAIN.PIPELINE") == 1
    assert "terminated with exit code 2" in result.stderr
    assert "Traceback" not in output
