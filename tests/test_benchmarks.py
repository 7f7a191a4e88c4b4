"""The benchmark scripts run (tiny settings): they must not rot. Their figures are not tested."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch

from direct_pretrain.pipeline import run_pipeline

from conftest import ROOT, tiny_cfg

BENCH = ROOT / "benchmarks"


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_phase_cost_and_data_loading(synthetic_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(synthetic_data, tmp_path / "out").dump())
    cost = _script(
        "phase_cost.py",
        "--config-file",
        str(config),
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "cost.json"),
    )
    assert cost.returncode == 0, cost.stderr[-2000:]
    assert "| pre-train |" in cost.stdout and "speed-up / ratio" in cost.stdout
    results = json.loads((tmp_path / "cost.json").read_text())["results"]
    assert results["pre-train"]["pixels"] * 4 == results["fine-tune"]["pixels"]
    loading = _script(
        "data_loading.py",
        "--config-file",
        str(config),
        "--batches",
        "2",
        "--warmup",
        "1",
        "--workers",
        "0",
    )
    assert loading.returncode == 0, loading.stderr[-2000:]
    assert "| low-res cache |" in loading.stdout


def test_memory_planner_says_it_needs_a_gpu():
    if torch.cuda.is_available():
        return
    planner = _script(
        "memory_planner.py", "--config-file", "configs/COCO/faster_rcnn_R_50_FPN_direct_P1x_1x.yaml"
    )
    assert planner.returncode == 1 and "needs a GPU" in planner.stderr


def test_equal_compute_collects_and_plots(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("equal_compute", BENCH / "equal_compute.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    run_pipeline(tiny_cfg(synthetic_data, tmp_path / "direct" / "seed0"))
    result = study.collect(tmp_path / "direct" / "seed0")
    assert {"AP", "AP50", "train_seconds", "curves"} <= result.keys()
    assert set(result["curves"]) == {"PRETRAIN", "FINETUNE"}
    study.plot({"direct": [result]}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
