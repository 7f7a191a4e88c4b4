"""predict.py jobs: batched tiles, results written per image and resumed, large images."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_predict import TILE, _image, _predict_cli, run_dir  # noqa: F401 (run_dir: a fixture)

from direct_pretrain.predict import (
    Predictor,
    SettingsMismatchError,
    load_run,
    overlap_pixels,
    predict_tiled,
)

from conftest import ROOT


def _outputs(out: Path) -> tuple[dict, Counter, Counter, Counter]:
    """Per file: its JSON-lines record; how many JSON-lines records, CSV rows and COCO
    results name it."""
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    with open(out / "predictions.csv", newline="") as f:
        rows = Counter(row["image_path"] for row in csv.DictReader(f))
    results = Counter(r["file_name"] for r in json.loads((out / "predictions.json").read_text()))
    return {r["file_name"]: r for r in lines}, Counter(r["file_name"] for r in lines), rows, results


def _check_each_image_once(out: Path, files: list[str]) -> None:
    records, lines, rows, results = _outputs(out)
    assert sorted(lines) == sorted(files) and set(lines.values()) == {1}
    coco = json.loads((out / "images.json").read_text())["images"]
    assert sorted(i["file_name"] for i in coco) == sorted(files)
    for name, record in records.items():
        assert rows[name] == results[name] == len(record["detections"]) > 0, name


def test_batch_4_gives_the_boxes_of_batch_1(run_dir, tmp_path):  # noqa: F811
    predictor = Predictor(load_run(run_dir, device="cpu"))
    image = _image(150, 130, 11)[:, :, ::-1].copy()  # BGR, 3 x 3 tiles

    def one(im):
        return predictor(im)["instances"].to("cpu")

    def many(ims):
        return [o["instances"].to("cpu") for o in predictor.predict_batch(ims)]

    overlap = overlap_pixels(TILE, 0.25)
    single, used = predict_tiled(one, image, TILE, overlap)
    calls = []
    batched, used4 = predict_tiled(
        one, image, TILE, overlap, predict_batch=lambda ims: calls.append(len(ims)) or many(ims)
    )
    assert calls == []  # batch 1: predict_batch is not used
    batched, used4 = predict_tiled(
        one,
        image,
        TILE,
        overlap,
        predict_batch=lambda ims: calls.append(len(ims)) or many(ims),
        batch=4,
    )
    assert used == used4 == 9 and calls == [4, 4, 1]
    assert len(single) == len(batched) > 0
    assert torch.allclose(single.pred_boxes.tensor, batched.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(single.scores, batched.scores, atol=1e-4)
    assert torch.equal(single.pred_classes, batched.pred_classes)
    # Through the command: the same outputs.
    Image.fromarray(image[:, :, ::-1]).save(tmp_path / "large.png")
    argv = ["--input", str(tmp_path / "large.png"), "--confidence-threshold", "0"]
    argv += ["--save", "json", "--opts", "MODEL.DEVICE", "cpu"]
    for batch in ("1", "4"):
        _predict_cli(
            "--run", str(run_dir), "--output", str(tmp_path / batch), "--batch", batch, *argv
        )
    one_by_one, four = (json.loads((tmp_path / b / "predictions.json").read_text()) for b in "14")
    assert len(one_by_one) == len(four) > 0
    for a, b in zip(one_by_one, four):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.011)  # rounded to 0.01 px
        assert a["score"] == pytest.approx(b["score"], abs=2e-5)  # rounded to 1e-5
        assert a["category_id"] == b["category_id"]
    with pytest.raises(ValueError, match="--batch 2 with --model: an exported model takes one"):
        _predict_cli(
            "--model", str(tmp_path), "--output", str(tmp_path / "m"), "--batch", "2", *argv[:2]
        )


@pytest.fixture
def photos(tmp_path) -> list[str]:
    """Six 400x400 images (64 tiles each)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(_image(400, 400, 20 + i)).save(folder / f"p{i}.png")
    return [str(folder / f"p{i}.png") for i in range(6)]


def test_a_killed_job_resumes_and_writes_each_image_once(run_dir, photos, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--input", str(Path(photos[0]).parent), "--output", str(out)]
    argv += ["--confidence-threshold", "0", "--opts", "MODEL.DEVICE", "cpu"]
    job = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    jobs = out / "predictions.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (jobs.is_file() and jobs.read_bytes().count(b"\n") >= 1):
            assert job.poll() is None, "the job ended before it was killed"
            assert time.monotonic() < deadline, "no image finished in 300 s"
            time.sleep(0.02)
        assert job.poll() is None, "the job ended before it was killed"
    finally:
        job.kill()  # SIGKILL: no clean-up of any kind
        job.wait()
    done = jobs.read_bytes().count(b"\n")
    assert 1 <= done < len(photos)
    summary = _predict_cli(*argv)
    log = (out / "log.txt").read_text()
    message = f"{done} of 6 images already done in {out}, predicting the other {6 - done}"
    assert message in log
    assert summary["already_done"] == done and summary["predicted"] == 6 - done
    assert summary["images"] == 6 and summary["tiles"] == 6 * 64
    _check_each_image_once(out, photos)
    assert len(list((out / "images").glob("*.jpg"))) == 6


def test_a_half_written_last_line_is_redone(run_dir, photos, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--input", *photos[:3], "--output", str(out)]
    argv += ["--confidence-threshold", "0", "--tile-size", "400", "--save", "json", "csv"]
    first = _predict_cli(*argv)
    jobs = out / "predictions.jsonl"
    data = jobs.read_bytes()
    jobs.write_bytes(data[: len(data) - 25])  # killed while writing the third line
    # The CSV holds the third image's rows (appended before its line): they must not repeat.
    summary = _predict_cli(*argv)
    assert summary["already_done"] == 2 and summary["predicted"] == 1
    assert "ignoring its half-written last line" in (out / "log.txt").read_text()
    _check_each_image_once(out, photos[:3])
    assert summary["detections"] == first["detections"]
    # Done: a third run predicts nothing and rewrites the same results.
    results = (out / "predictions.json").read_text()
    again = _predict_cli(*argv)
    assert again["already_done"] == 3 and again["predicted"] == 0
    assert (out / "predictions.json").read_text() == results


def test_other_settings_are_refused_unless_overwrite(run_dir, photos, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = ["--input", photos[0], "--output", str(out), "--tile-size", "400", "--save", "json"]
    _predict_cli("--run", str(run_dir), *argv, "--confidence-threshold", "0")
    settings = json.loads((out / "predict_settings.json").read_text())
    assert settings["model"]["path"] == str(run_dir / "model_final.pth")
    assert settings["score_threshold"] == 0 and settings["tile_size"] == 400
    with pytest.raises(
        SettingsMismatchError,
        match=r"holds predictions made with other settings \(predict_settings\.json\): "
        r"score_threshold: 0\.0 before, 0\.3 now\. Pass --overwrite",
    ):
        _predict_cli("--run", str(run_dir), *argv, "--confidence-threshold", "0.3")
    # Another model file of the same path (retrained): refused, naming its identity.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_final.pth", "config_predict.yaml", "classes.json", "summary.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(SettingsMismatchError, match=r"model\.mtime_ns: .*model\.path: "):
        _predict_cli("--run", str(run), *argv, "--confidence-threshold", "0")
    # The same settings with another batch continue the job (nothing left to do).
    same = _predict_cli("--run", str(run_dir), *argv, "--confidence-threshold", "0", "--batch", "3")
    assert same["already_done"] == 1 and same["predicted"] == 0
    replaced = _predict_cli(
        "--run", str(run), *argv, "--confidence-threshold", "0.3", "--overwrite"
    )
    assert replaced["already_done"] == 0 and replaced["predicted"] == 1
    saved = json.loads((out / "predict_settings.json").read_text())
    assert saved["score_threshold"] == 0.3 and saved["model"]["path"] == str(
        run / "model_final.pth"
    )
    results = json.loads((out / "predictions.json").read_text())
    assert min(r["score"] for r in results) >= 0.3 if results else True


MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from direct_pretrain.predict import PredictionWriter, Predictor, class_info, load_run
    from direct_pretrain.predict import predict_images

    run, small, large, out = sys.argv[1:5]
    cfg = load_run(run, device="cpu")
    predictor, classes = Predictor(cfg), class_info(cfg, run)

    def predict(path, folder):
        writer = PredictionWriter(folder, classes, ("json", "csv"))
        return predict_images(predictor, [path], writer, 512, 128, score_thresh=0.0)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    predict(small, out + "/small")  # model and tile working memory in the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the resident memory now
    rss = status("VmRSS:")
    summary = predict(large, out + "/large")
    print(json.dumps({"rss_kib": rss, "peak_kib": status("VmHWM:"), "tiles": summary["tiles"]}))
    """)


def test_a_large_image_is_decoded_once_and_cut_into_tiles(run_dir, tmp_path):  # noqa: F811
    side = 4000
    image = np.full((side, side, 3), 40, dtype=np.uint8)
    image[::97, :] = 200  # lines: some structure, quick to encode
    image[:, ::89] = 120
    Image.fromarray(image).save(tmp_path / "large.png", compress_level=1)
    Image.fromarray(image[:600, :600]).save(tmp_path / "small.png")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(run_dir), str(tmp_path / "small.png")]
        + [str(tmp_path / "large.png"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    decoded = side * side * 3
    increase = (figures["peak_kib"] - figures["rss_kib"]) * 1024
    assert figures["tiles"] == 11 * 11
    # Pillow holds RGB in 4 bytes a pixel (1.33x); an array copy of the whole would add 1x.
    assert increase < 2.0 * decoded + 30e6, f"peak RSS rose by {increase / decoded:.2f}x the image"
