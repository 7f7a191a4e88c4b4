"""predict.py and direct_pretrain.predict: loading a finished run, tiled prediction, outputs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.predict import (
    Predictor,
    UnfinishedPhaseError,
    coco_box_ap,
    load_predict_config,
    load_run,
    merge_tile_predictions,
    overlap_pixels,
    predict_tiled,
    run_score_threshold,
    tile_windows,
)

from conftest import ROOT, tiny_cfg

TILE = 64  # the tiny run's test size, so the default tile size


@pytest.fixture(scope="module")
def run_dir(synthetic_data, tmp_path_factory) -> Path:
    """A finished one-phase tiny run with pixel statistics computed on its training set."""
    out = tmp_path_factory.mktemp("predict_run")
    cfg = tiny_cfg(synthetic_data, out)
    cfg.DIRECT_PRETRAIN.PIPELINE = ["PRETRAIN"]
    cfg.DIRECT_PRETRAIN.PIXEL_STATS = "dataset"
    cfg.DIRECT_PRETRAIN.PRETRAIN.MIN_SIZE_TEST = TILE
    cfg.DIRECT_PRETRAIN.PRETRAIN.MAX_SIZE_TEST = TILE
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model: keep every detection
    run_pipeline(cfg)
    return out


def _cli():
    spec = importlib.util.spec_from_file_location("predict_cli", ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predict_cli(*argv: str) -> dict:
    cli = _cli()
    return cli.main(cli.get_parser().parse_args(list(argv)))


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A dark image with bright rectangles (RGB)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(6):
        h, w = rng.integers(8, 30, 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = rng.integers(150, 255, 3, dtype=np.uint8)
    return image


def _same(a: Instances, b: Instances) -> bool:
    return (
        torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        and torch.equal(a.scores, b.scores)
        and torch.equal(a.pred_classes, b.pred_classes)
    )


def test_prediction_writes_loadable_json_csv_and_drawn_images(run_dir, synthetic_data, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(_image(150, 130, 0)).save(inputs / "large.png")  # tiled
    Image.fromarray(_image(TILE, TILE, 1)).save(inputs / "sub" / "tile.jpg")  # one tile
    val_image = inputs / "val.png"  # an image of the run's validation set
    val_image.write_bytes(sorted(Path(synthetic_data["val"][1]).glob("*.png"))[0].read_bytes())
    out = tmp_path / "out"
    summary = _predict_cli(
        "--run",
        str(run_dir),
        "--input",
        str(inputs / "large.png"),
        str(inputs / "sub" / "*.jpg"),
        str(val_image),
        "--output",
        str(out),
        "--confidence-threshold",
        "0",
        "--opts",
        "MODEL.DEVICE",
        "cpu",
    )
    files = [str(inputs / "large.png"), str(inputs / "sub" / "tile.jpg"), str(val_image)]
    assert summary["images"] == 3 and summary["skipped"] == []
    # 150x130 at 64 px tiles overlapping by 16: 3 x 3 tiles; the others are one tile each
    assert summary["tiles"] == 9 + 1 + 1
    results = json.loads((out / "predictions.json").read_text())
    assert summary["detections"] == len(results) > 0
    assert {r["file_name"] for r in results} <= set(files)
    assert {(r["category_id"], r["category_name"]) for r in results} == {(1, "box")}
    coco = COCO(str(out / "images.json"))
    loaded = coco.loadRes(str(out / "predictions.json"))
    assert len(loaded.getAnnIds()) == len(results)
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == files
    assert (coco.imgs[1]["width"], coco.imgs[1]["height"]) == (130, 150)
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
    assert len(rows) == len(results)
    first = rows[0]
    x, y, w, h = results[0]["bbox"]
    assert float(first["xmin"]) == x and float(first["xmax"]) == pytest.approx(x + w, abs=0.02)
    assert first["label"] == "box" and float(first["score"]) == results[0]["score"]
    drawn = sorted(p.relative_to(out / "images") for p in (out / "images").rglob("*.jpg"))
    assert [str(p) for p in drawn] == ["large.jpg", "sub/tile.jpg", "val.jpg"]
    assert Image.open(out / "images" / "sub" / "tile.jpg").size == (TILE, TILE)
    assert json.loads((out / "summary.json").read_text())["tiles_per_second"] > 0
    assert "ETA" in (out / "log.txt").read_text()


def test_unreadable_file_is_skipped_and_named(run_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(_image(TILE, TILE, 2)).save(inputs / "good.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    good = (inputs / "good.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])
    (inputs / "notes.txt").write_text("not an image file name: not taken from the folder")
    out = tmp_path / "out"
    summary = _predict_cli(
        "--run",
        str(run_dir),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--confidence-threshold",
        "0",
        "--save",
        "json",
    )
    bad = [str(inputs / "broken.png"), str(inputs / "truncated.png")]
    assert summary["skipped"] == bad
    assert summary["images"] == 1
    log = (out / "log.txt").read_text()
    for path in bad:
        assert f"Skipping '{path}'" in log
    assert "Skipped 2 unreadable file(s): " + ", ".join(bad) in log
    assert "notes.txt" not in log
    images = json.loads((out / "images.json").read_text())["images"]
    assert [i["file_name"] for i in images] == [str(inputs / "good.png")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _predict_cli(
            "--run", str(run_dir), "--input", str(tmp_path / "nowhere"), "--output", str(out)
        )


def test_default_predictor_lines_and_one_tile_equals_plain_inference(run_dir, tmp_path):
    # The README's lines: a DefaultPredictor for a finished run.
    cfg = load_run(run_dir)
    predictor = DefaultPredictor(cfg)
    image = _image(TILE, TILE, 3)[:, :, ::-1].copy()  # BGR, as DefaultPredictor takes
    plain = predictor(image)["instances"].to("cpu")
    assert len(plain) > 0
    assert cfg.MODEL.WEIGHTS == str(run_dir / "model_final.pth")
    # The project's predictor (strict weight loading) gives the same.
    assert _same(Predictor(cfg)(image)["instances"].to("cpu"), plain)
    # An image of exactly one tile: tiled prediction is plain inference.
    tiled, used = predict_tiled(
        lambda im: predictor(im)["instances"].to("cpu"), image, TILE, overlap_pixels(TILE, 0.25)
    )
    assert used == 1 and _same(tiled, plain)
    # ... through the whole command too (outputs rounded to 0.01 px / 1e-5).
    Image.fromarray(image[:, :, ::-1]).save(tmp_path / "one_tile.png")
    _predict_cli(
        "--run",
        str(run_dir),
        "--input",
        str(tmp_path / "one_tile.png"),
        "--output",
        str(tmp_path / "out"),
        "--confidence-threshold",
        "0",
        "--save",
        "json",
    )
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    boxes = plain.pred_boxes.tensor
    expected = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    assert torch.allclose(torch.tensor([r["bbox"] for r in results]), expected, atol=0.011)
    assert torch.allclose(torch.tensor([r["score"] for r in results]), plain.scores, atol=1e-5)


def _instances(size: tuple[int, int], boxes, scores, classes) -> Instances:
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_merge_removes_a_duplicate_that_spans_two_tiles():
    # A 160x100 image in two tiles: A = x 0..100, B = x 60..160 (overlap 40 px).
    left, right = (0, 0, 100, 100), (60, 0, 160, 100)
    tile_a = _instances(
        (100, 100),
        [
            [40, 20, 90, 60],  # object 1, whole in A
            [70, 70, 85, 90],  # object 2, inside the overlap: whole in both tiles
            [92, 5, 100, 15],  # object 3 cut by A's right border; not in B's detections
        ],
        [0.8, 0.7, 0.6],
        [0, 0, 0],
    )
    tile_b = _instances(
        (100, 100),
        [
            [0, 20, 30, 60],  # object 1's fragment (x 60..90), cut by B's left border
            [10, 70, 25, 90],  # object 2 again (x 70..85)
            [0, 40, 20, 55],  # another class at B's left border: not object 1's fragment
            [70, 30, 100, 60],  # object 4 at the image's right border (not cut by a tile)
        ],
        [0.9, 0.75, 0.5, 0.4],
        [0, 0, 1, 0],
    )
    merged = merge_tile_predictions([(left, tile_a), (right, tile_b)], (100, 160), 0.5)
    got = sorted(
        (tuple(b), round(s, 2), c)
        for b, s, c in zip(
            merged.pred_boxes.tensor.tolist(), merged.scores.tolist(), merged.pred_classes.tolist()
        )
    )
    assert got == [
        ((40.0, 20.0, 90.0, 60.0), 0.8, 0),  # the whole object 1, not its better-scored fragment
        ((60.0, 40.0, 80.0, 55.0), 0.5, 1),
        ((70.0, 70.0, 85.0, 90.0), 0.75, 0),  # one copy of object 2
        ((92.0, 5.0, 100.0, 15.0), 0.6, 0),  # a cut box with no whole one stays
        ((130.0, 30.0, 160.0, 60.0), 0.4, 0),
    ]
    assert merged.image_size == (100, 160)
    # Plain NMS alone keeps the fragment (IoU 0.6 with the whole box, higher score).
    boxes = torch.tensor([[40, 20, 90, 60], [60, 20, 90, 60]], dtype=torch.float32)
    kept = batched_nms(boxes, torch.tensor([0.8, 0.9]), torch.tensor([0, 0]), 0.5)
    assert kept.tolist() == [1]


def test_tile_windows_cover_the_image_with_the_overlap():
    windows = tile_windows(150, 130, 64, 16)
    assert windows[:3] == [(0, 0, 64, 64), (48, 0, 112, 64), (86, 0, 150, 64)]
    assert len(windows) == 9 and windows[-1] == (86, 66, 150, 130)
    covered = np.zeros((130, 150), dtype=bool)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == 64 and y1 - y0 == 64
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_windows(64, 64, 64, 16) == [(0, 0, 64, 64)]  # one tile: the image
    assert tile_windows(40, 100, 64, 16) == [(0, 0, 40, 64), (0, 36, 40, 100)]
    assert overlap_pixels(256, 0.25) == 64 and overlap_pixels(256, 96) == 96
    with pytest.raises(ValueError, match="tile overlap 256"):
        overlap_pixels(256, 256)


def test_saved_configs_of_a_run_load(run_dir, tmp_path):
    weights = str(run_dir / "model_final.pth")
    saved = torch.load(weights, weights_only=True)
    image = _image(TILE, TILE, 4)[:, :, ::-1].copy()
    reference = Predictor(load_run(run_dir))(image)["instances"].to("cpu")
    for name in ("config_predict.yaml", "pretrain/phase_config.yaml", "config.yaml"):
        cfg = load_predict_config(str(run_dir / name), weights)
        assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx(saved["pixel_mean"]), name
        assert list(cfg.MODEL.PIXEL_STD) == pytest.approx(saved["pixel_std"]), name
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (TILE, TILE), name
        assert _same(Predictor(cfg)(image)["instances"].to("cpu"), reference), name
    # The exported config is plain Detectron2: its own get_cfg() loads it.
    cfg = d2_get_cfg()
    cfg.merge_from_file(str(run_dir / "config_predict.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    assert cfg.MODEL.WEIGHTS == os.path.abspath(weights)
    assert _same(DefaultPredictor(cfg)(image)["instances"].to("cpu"), reference)
    assert json.loads((run_dir / "classes.json").read_text())["thing_classes"] == ["box"]
    # A training config's MODEL.WEIGHTS is where training started: trained weights are needed.
    with pytest.raises(ValueError, match=r"config\.yaml is a training or phase config"):
        load_predict_config(str(run_dir / "config.yaml"))
    # Its dataset pixel statistics must come with the weights (or the folder beside them).
    bare = tmp_path / "bare.pth"
    torch.save({"model": saved["model"]}, bare)
    with pytest.raises(ValueError, match=r"PIXEL_STATS 'dataset'.*bare\.pth"):
        load_predict_config(str(run_dir / "config.yaml"), str(bare))


@pytest.fixture
def killed_in_finetune(run_dir, tmp_path) -> Path:
    """``run_dir`` (a finished pre-train-only run) rerun as PRETRAIN then FINETUNE and killed
    while fine-tuning: config.yaml names both phases, finetune/ holds a checkpoint and no
    phase_done.json, and model_final.pth is still the pre-train model."""
    run = tmp_path / "run"
    skip = shutil.ignore_patterns("cache", "report", "inference", "model_0*.pth", "events.*")
    shutil.copytree(run_dir, run, ignore=skip)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["DIRECT_PRETRAIN"]["PIPELINE"] = ["PRETRAIN", "FINETUNE"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    finetune = run / "finetune"
    finetune.mkdir()
    shutil.copy(run / "pretrain" / "phase_config.yaml", finetune)
    (finetune / "model_0000004.pth").touch()
    (finetune / "last_checkpoint").write_text("model_0000004.pth")
    return run


def test_run_killed_in_a_later_phase_is_refused(killed_in_finetune, tmp_path):
    run = killed_in_finetune
    image = tmp_path / "one.png"
    Image.fromarray(_image(TILE, TILE, 5)).save(image)
    expected = (
        f"{run}: its last phase FINETUNE has not finished ({run}/finetune holds checkpoints up "
        "to iteration 5 (model_0000004.pth); no phase_done.json); model_final.pth is the final "
        "model of PRETRAIN from an earlier run. Rerun train_net.py with the same command to "
        "finish it, or pass --phase PRETRAIN to predict with that phase's final model."
    )
    with pytest.raises(UnfinishedPhaseError, match=f"^{re.escape(expected)}$"):
        _predict_cli("--run", str(run), "--input", str(image), "--output", str(tmp_path / "out"))
    # The last phase finished, but the run stopped before writing its final model.
    shutil.copy(run / "pretrain" / "phase_done.json", run / "finetune")
    with pytest.raises(
        UnfinishedPhaseError,
        match=r"last phase FINETUNE has finished, but the run stopped before writing its final "
        r"model; model_final\.pth is the final model of PRETRAIN from an earlier run\..* "
        r"--phase FINETUNE ",
    ):
        load_run(run)
    # Without a readable config.yaml, the unfinished phase folder newer than the model says it.
    (run / "finetune" / "phase_done.json").unlink()
    (run / "config.yaml").write_text("not: [a config")
    os.utime(run / "model_final.pth", (0, 0))
    with pytest.raises(UnfinishedPhaseError, match=re.escape(expected)):
        load_run(run)


def test_phase_predicts_with_the_final_model_of_a_finished_phase(
    run_dir, killed_in_finetune, tmp_path
):
    run = killed_in_finetune
    cfg = load_run(run, phase="PRETRAIN")
    assert cfg.MODEL.WEIGHTS == str(run / "pretrain" / "model_final.pth")
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (TILE, TILE)
    image = _image(TILE, TILE, 6)[:, :, ::-1].copy()
    reference = Predictor(load_run(run_dir))(image)["instances"].to("cpu")
    assert _same(Predictor(cfg)(image)["instances"].to("cpu"), reference)
    Image.fromarray(image[:, :, ::-1]).save(tmp_path / "one.png")
    argv = ["--input", str(tmp_path / "one.png"), "--output", str(tmp_path / "out")]
    summary = _predict_cli("--run", str(run), "--phase", "PRETRAIN", *argv)
    assert summary["images"] == 1 and summary["skipped"] == []
    with pytest.raises(
        UnfinishedPhaseError,
        match=rf"phase FINETUNE has not finished \({re.escape(str(run))}/finetune holds "
        r"checkpoints up to iteration 5 \(model_0000004\.pth\); no phase_done\.json\)",
    ):
        _predict_cli("--run", str(run), "--phase", "FINETUNE", *argv)
    box_domain = run / "box_domain"  # a finished AlignDet box-domain phase
    shutil.copytree(run / "pretrain", box_domain)
    with pytest.raises(ValueError, match="phase BOX_DOMAIN is not a detector"):
        load_run(run, phase="BOX_DOMAIN")
    with pytest.raises(ValueError, match=r"no phase NONE \(its phases: BOX_DOMAIN, FINETUNE, "):
        load_run(run, phase="NONE")
    with pytest.raises(ValueError, match="--phase needs --run"):
        _predict_cli(
            "--config-file", str(run / "config_predict.yaml"), "--phase", "PRETRAIN", *argv
        )


def test_finished_run_without_its_phase_folders_loads(run_dir, tmp_path):
    # Phase folders (checkpoints) deleted to keep the final model alone: still a finished run.
    run = tmp_path / "run"
    keep = ("model_final.pth", "config_predict.yaml", "classes.json", "summary.json", "config.yaml")
    run.mkdir()
    for name in keep:
        shutil.copy(run_dir / name, run)
    assert load_run(run).MODEL.WEIGHTS == str(run / "model_final.pth")


def test_run_saved_score_threshold_is_the_default_and_the_flag_overrides_it(run_dir, tmp_path):
    run = tmp_path / "run"  # the run without the threshold its pipeline may have saved
    run.mkdir()
    for name in ("model_final.pth", "config_predict.yaml", "classes.json", "summary.json"):
        shutil.copy(run_dir / name, run)
    image = tmp_path / "one.png"
    Image.fromarray(_image(TILE, TILE, 7)).save(image)

    def predict(name: str, *flags: str) -> tuple[list[float], str]:
        out = tmp_path / name
        argv = ["--run", str(run), "--input", str(image), "--output", str(out), *flags]
        _predict_cli(*argv, "--opts", "MODEL.DEVICE", "cpu")
        results = json.loads((out / "predictions.json").read_text())
        return sorted(r["score"] for r in results), (out / "log.txt").read_text()

    scores, log = predict("default")
    assert "score threshold 0.5 (default)" in log and min(scores, default=1) >= 0.5
    every, log = predict("all", "--confidence-threshold", "0")
    assert "score threshold 0 (--confidence-threshold)" in log
    k = int(np.argmax(np.diff(every))) + 1  # between the two scores furthest apart: clear of
    threshold = (every[k - 1] + every[k]) / 2  # the written scores' rounding
    saved = {"score_threshold": threshold, "f1": 0.5, "iou": 0.5, "dataset": "tiny_val"}
    saved["phase"] = "PRETRAIN"  # the phase of the run's final model
    (run / "predict_threshold.json").write_text(json.dumps(saved))
    scores, log = predict("saved")
    assert scores == every[k:]
    assert f"score threshold {threshold:.3g} (the run's F1-best on tiny_val)" in log
    scores, log = predict("flag", "--confidence-threshold", "0")
    assert scores == every and "score threshold 0 (--confidence-threshold)" in log
    # The threshold belongs to the run's final model: not to another phase's.
    assert run_score_threshold(run, "pretrain") == (threshold, "the run's F1-best on tiny_val")
    assert run_score_threshold(run, "FINETUNE") is None


def test_coco_box_ap_matches_pycocotools():
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)]
    annotations, results = [], []
    for image_id in (1, 2):
        for _ in range(8):
            x, y, w, h = (float(v) for v in rng.uniform(5, 60, 4))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "category_id": 1,
                }
            )
            jitter = [float(v) for v in rng.normal(0, 3, 4)]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                    "score": float(rng.uniform()),
                }
            )
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    reference = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    ap = coco_box_ap(gt, results)
    assert 10 < ap["AP"] < 90
    assert [ap["AP"], ap["AP50"], ap["AP75"]] == pytest.approx(100 * reference.stats[:3])


def test_whole_image_demo_script(run_dir):
    # The script `make demo` ends with, on the smallest embedded image (400x400: 64 tiles).
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "whole_image_demo.py"),
            "--run",
            str(run_dir),
            "--source",
            "OSBS_029",
            "--opts",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((run_dir / "report" / "whole_image.json").read_text())
    assert figures["predict"]["tiles"] == 64 and figures["image_tiles_count"] == 4
    assert figures["crowns"] == 61
    for row in ("whole_image", "image_tiles"):
        assert set(figures[row]) == {"AP", "AP50", "AP75"}
    table = (run_dir / "report" / "whole_image.md").read_text()
    assert "| this image whole" in table and "--opts MODEL.RPN.POST_NMS_TOPK_TEST 50" in table
    assert Image.open(run_dir / "report" / "whole_image.jpg").size == (400, 400)
