"""The benchmark scripts run (tiny settings): they must not rot. Their figures are not tested."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch

from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.run_folder import DETECTIONS_FILE

from conftest import ROOT, tiny_cfg, write_config

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
    write_config(tiny_cfg(synthetic_data, tmp_path / "out"), config)
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


def test_prediction_benchmarks(synthetic_data, tmp_path):
    run = tmp_path / "run"
    run_pipeline(tiny_cfg(synthetic_data, run))
    throughput = _script(
        "predict_throughput.py",
        *("--run", str(run), "--image", "150", "--tiles", "4", "--batches", "1", "2"),
        *("--json", str(tmp_path / "throughput.json")),
    )
    assert throughput.returncode == 0, throughput.stderr[-2000:]
    assert "| Detectron2 DefaultPredictor | 1 |" in throughput.stdout
    assert "| direct_pretrain Predictor | 2 |" in throughput.stdout
    results = json.loads((tmp_path / "throughput.json").read_text())["results"]
    assert results["batch 2"]["image_tiles"] == 9  # 150 px at 64 px tiles
    large = _script("large_image.py", "--run", str(run), "--side", "600", "--tile", "128")
    assert large.returncode == 0, large.stderr[-2000:]
    assert "peak increase / decoded bytes" in large.stdout and "| 600x600 |" in large.stdout


def test_memory_planner_says_it_needs_a_gpu():
    if torch.cuda.is_available():
        return
    planner = _script(
        "memory_planner.py", "--config-file", "configs/COCO/faster_rcnn_R_50_FPN_direct_P1x_1x.yaml"
    )
    assert planner.returncode == 1 and "needs a GPU" in planner.stderr


def _study(monkeypatch, name: str):
    """A benchmark script imported as a module (``common`` importable, as when run)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_compute_collects_and_plots(synthetic_data, tmp_path, monkeypatch):
    study = _study(monkeypatch, "equal_compute")
    run_pipeline(tiny_cfg(synthetic_data, tmp_path / "direct" / "seed0"))
    wall = study.collect_run(tmp_path / "direct" / "seed0")
    assert {"AP", "AP50", "train_seconds", "curves"} <= wall.keys()
    cpu = study.collect_run(tmp_path / "direct" / "seed0", clock="cpu")
    assert cpu["train_cpu_seconds"] > 0
    # The final evaluation is at the end of training on either clock (evaluation excluded).
    for result, total in ((wall, "train_seconds"), (cpu, "train_cpu_seconds")):
        assert set(result["curves"]) == {"PRETRAIN", "FINETUNE"}
        assert 0 < result["curves"]["FINETUNE"][-1][0] <= result[total] + 0.5
    study.plot({"direct": [wall]}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_budget_study_scales_every_phase(synthetic_data, tmp_path, monkeypatch):
    study = _study(monkeypatch, "budget_study")
    # The demo's schedule (24 pre-train epochs at batch 8; 4 fine-tune epochs at batch 4, LR
    # drop at epoch 3) on the 8 synthetic training images.
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"_BASE_: {json.dumps(str(ROOT / 'configs/trees/faster_rcnn_R_18_FPN_direct.yaml'))}\n"
        f"DATASETS: {{TRAIN: [tiny_train], TEST: [tiny_val]}}\n"
        "DIRECT_PRETRAIN:\n  PIXEL_STATS: config\n"
        f"  CACHE_DIR: {json.dumps(str(tmp_path / 'cache'))}\n"
        f"  REGISTER_COCO: {json.dumps([[f'tiny_{k}', *v] for k, v in synthetic_data.items()])}\n"
    )
    opts = study.scaled_opts(str(config), 2)
    assert dict(zip(opts[::2], opts[1::2])) == {
        "DIRECT_PRETRAIN.PRETRAIN.EPOCHS": "48.0",
        "DIRECT_PRETRAIN.PRETRAIN.STEP_EPOCHS": "()",
        "DIRECT_PRETRAIN.PRETRAIN.EVAL_PERIOD": "5",  # 48 iterations
        "DIRECT_PRETRAIN.FINETUNE.EPOCHS": "8.0",
        "DIRECT_PRETRAIN.FINETUNE.STEP_EPOCHS": "(6.0,)",
        "DIRECT_PRETRAIN.FINETUNE.EVAL_PERIOD": "2",  # 16 iterations
    }


def test_budget_study_time_to_ap_and_crossings(monkeypatch):
    study = _study(monkeypatch, "budget_study")
    curve = [(60.0, 2.0), (120.0, 6.0), (180.0, 10.0)]
    assert study.time_to_ap(curve, 8.0) == 150.0
    assert study.time_to_ap(curve, 1.0) == 60.0  # already above at the first evaluation
    assert study.time_to_ap(curve, 10.5) is None
    rising, flat = [(0.0, 0.0), (10.0, 10.0)], [(0.0, 5.0), (4.0, 5.0), (20.0, 5.0)]
    assert study.crossings(rising, flat) == [5.0]
    assert study.crossings(flat, [(0.0, 1.0), (20.0, 2.0)]) == []
    scratch, direct = [(0.0, 0.0), (600.0, 10.0)], [(0.0, 5.0), (900.0, 5.0)]
    assert study.compare(scratch, direct) == (
        "from 0.0 to 10.0 CPU min: direct ahead by 5.0 AP at the start, cross at 5.0; "
        "scratch ahead by 5.0 AP at the end"
    )


def test_budget_study_tables(monkeypatch):
    study = _study(monkeypatch, "budget_study")

    def run(ap: float, seconds: float, curve: tuple = ()) -> dict:
        return {
            "AP": ap,
            "AP50": 3 * ap,
            "train_seconds": seconds,
            "train_cpu_seconds": seconds,
            "curves": {"FINETUNE": list(curve)},
            "resumed": False,
        }

    results = dict.fromkeys(study.planned())
    results["scratch", 1, 0] = run(10.0, 600.0)
    results["scratch", 1, 1] = run(12.0, 660.0)
    results["scratch", 2, 0] = run(15.0, 1200.0)
    results["direct", 1, 0] = run(14.0, 600.0, ((300.0, 8.0), (600.0, 14.0)))
    rows = {(r[0], r[1]): r for r in study.final_rows(results)}
    assert rows["scratch", "1x"][2:] == ["2/2", "11.0 +- 1.0", "33.0 +- 3.0"] + ["10.5 +- 0.5"] * 2
    assert rows["direct", "1x"][2:4] == ["1/2", "14.0"]
    assert rows["direct", "4x"][2:4] == ["0/1", "pending"]
    # Direct 1x reaches scratch 1x's 11.0 AP at 450 s, 0.71x scratch's 630 s; never 15.0.
    ttap = {r[0]: r for r in study.time_to_ap_rows(results)}
    assert set(ttap) == {"1x", "2x"}
    assert ttap["1x"][1:] == ["11.0", "10.5", "7.5 (0.71x)", "pending", "pending", "0.71x"]
    assert ttap["2x"][3:] == ["not reached (0/1 seeds)", "pending", "pending", "-"]


def test_budget_study_trains_only_the_methods_asked(tmp_path, monkeypatch):
    study = _study(monkeypatch, "budget_study")
    trained = []
    monkeypatch.setattr(study, "train", lambda out, *key: trained.append(key))
    monkeypatch.setattr(study, "report", lambda out, figure: "")
    monkeypatch.setattr(
        sys, "argv", ["budget_study.py", "--out", str(tmp_path), "--methods", "direct"]
    )
    study.main()
    assert trained == [key for key in study.planned() if key[0] == "direct"] and len(trained) == 5


def test_slice_noise_gives_the_difference_and_its_jackknife_error(tmp_path, monkeypatch):
    """Three slice images with one box each; the pre-trained model finds all three, the
    fine-tuned one misses the third: its AP is lower, and leaving images out moves the gap."""
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in (1, 2, 3)]
    box = [10.0, 10.0, 20.0, 20.0]
    anns = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": box, "area": 400.0, "iscrowd": 0}
        for i in (1, 2, 3)
    ]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "tree"}]}
    (tmp_path / "val_slice_coco.json").write_text(json.dumps(gt))
    found = {"pretrain": (1, 2, 3), "finetune": (1, 2)}
    for phase, hits in found.items():
        folder = tmp_path / phase / "val_slice" / "inference"
        folder.mkdir(parents=True)
        dets = [{"image_id": i, "category_id": 1, "bbox": box, "score": 0.9} for i in hits]
        (folder / "coco_instances_results.json").write_text(json.dumps(dets))
    row = _study(monkeypatch, "slice_noise").slice_noise(str(tmp_path))
    _, n, pretrain, finetune, difference, se, _ = row
    assert (n, pretrain) == (3, 100.0) and finetune < 100.0
    assert difference == round(pretrain - finetune, 1) and se > 0
    # On the test set (the same three images here) the fine-tune leads: the slice disagrees.
    (tmp_path / "test.json").write_text(json.dumps(gt))
    for phase, hits in {"pretrain": (1, 2), "finetune": (1, 2, 3)}.items():
        (tmp_path / phase / "inference").mkdir()
        dets = [{"image_id": i, "category_id": 1, "bbox": box, "score": 0.9} for i in hits]
        (tmp_path / phase / "inference" / DETECTIONS_FILE).write_text(json.dumps(dets))
    row = _study(monkeypatch, "slice_noise").slice_noise(str(tmp_path), str(tmp_path / "test.json"))
    test_difference, test_se, apart = row[7:]
    assert test_difference == -difference and test_se == se and apart > 0
