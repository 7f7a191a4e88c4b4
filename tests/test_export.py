"""tools/export_model.py and predict.py --model: TorchScript/ONNX exports checked against PyTorch."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image
from test_predict import TILE, _image, _predict_cli, run_dir  # noqa: F401 (run_dir: a fixture)

from direct_pretrain.predict import (
    ExportedPredictor,
    ExportError,
    ExportMismatchError,
    Predictor,
    check_export,
    check_images,
    class_info,
    export_model,
    load_predict_config,
    load_run,
)

from conftest import ROOT


def _export_cli(*argv: str) -> list[dict]:
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "tools" / "export_model.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(cli.get_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def inputs(synthetic_data, tmp_path_factory) -> Path:
    """The run's validation images and a larger, not square image (3 x 3 tiles)."""
    folder = tmp_path_factory.mktemp("export_inputs")
    for path in sorted(Path(synthetic_data["val"][1]).glob("*.png")):
        shutil.copy(path, folder / path.name)
    Image.fromarray(_image(150, 130, 0)).save(folder / "large.png")
    return folder


@pytest.fixture(scope="module")
def ts_export(run_dir, inputs, tmp_path_factory) -> tuple[Path, list[dict]]:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "ts"
    args = ["--run", str(run_dir), "--format", "torchscript", "--output", str(out)]
    rows = _export_cli(*args, "--images", str(inputs))
    return out, rows


def test_torchscript_export_matches_pytorch_and_says_how_to_use_it(ts_export):
    out, rows = ts_export
    assert len(rows) == 4 and all(r["boxes"] > 0 for r in rows)
    assert all(r["boxes"] == r["exported_boxes"] == r["matched"] for r in rows)
    assert max(r["box_diff"] for r in rows) <= 1e-3
    assert max(r["score_diff"] for r in rows) <= 1e-4
    info = json.loads((out / "export.json").read_text())
    assert (out / info["model_file"]).is_file() and info["format"] == "torchscript"
    assert info["input_format"] == "BGR" and info["pixel_normalisation_in_model"] is True
    assert (info["resize"]["short_side"], info["resize"]["max_size"]) == (TILE, TILE)
    assert info["outputs"] == ["boxes", "classes", "scores", "image_size"]
    assert info["class_names"] == ["box"] and info["category_ids"] == [1]
    assert info["score_threshold"] == 0.0  # the run's ROI_HEADS.SCORE_THRESH_TEST


def test_a_perturbed_export_fails_the_check(ts_export, run_dir, inputs, tmp_path):  # noqa: F811
    out, _ = ts_export
    model = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # the first convolution's weights
    bad = tmp_path / "bad"
    bad.mkdir()
    model.save(str(bad / "model.ts"))
    shutil.copy(out / "export.json", bad / "export.json")
    cfg = load_run(run_dir, device="cpu")
    with pytest.raises(ExportMismatchError, match="differs from the PyTorch model on image"):
        check_export(Predictor(cfg), ExportedPredictor(bad), check_images(cfg, [str(inputs)]))


def test_predict_with_the_export_writes_the_run_predictions(
    ts_export, run_dir, inputs, tmp_path
):  # noqa: F811
    out, _ = ts_export
    common = ["--input", str(inputs), "--confidence-threshold", "0"]
    cpu = ["--opts", "MODEL.DEVICE", "cpu"]
    by_run = _predict_cli("--run", str(run_dir), "--output", str(tmp_path / "run"), *common, *cpu)
    by_export = _predict_cli("--model", str(out), "--output", str(tmp_path / "ts"), *common)
    assert by_export["tiles"] == by_run["tiles"] == 9 + 3  # large.png in 3 x 3 tiles
    expected = json.loads((tmp_path / "run" / "predictions.json").read_text())
    results = json.loads((tmp_path / "ts" / "predictions.json").read_text())
    assert len(results) == len(expected) > 0
    for got, want in zip(results, expected):
        assert got["file_name"] == want["file_name"]
        assert got["category_id"] == want["category_id"] == 1
        assert got["bbox"] == pytest.approx(want["bbox"], abs=0.011)  # rounded to 0.01 px
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
    assert (tmp_path / "ts" / "predictions.csv").is_file()


def test_onnx_export_matches_pytorch(run_dir, inputs, tmp_path):  # noqa: F811
    cfg = load_run(run_dir, device="cpu")
    rows = export_model(
        cfg, class_info(cfg, run_dir), "onnx", tmp_path, check_images(cfg, [str(inputs)])
    )
    assert len(rows) == 4 and all(
        r["boxes"] == r["exported_boxes"] == r["matched"] > 0 for r in rows
    )
    assert max(r["box_diff"] for r in rows) <= 1e-3
    assert (tmp_path / "model.onnx").is_file()


def test_mask_rcnn_is_refused(run_dir, tmp_path):  # noqa: F811
    config = str(run_dir / "config_predict.yaml")
    opts = ["MODEL.MASK_ON", "True"]
    mask_rcnn = build_model(load_predict_config(config, opts=opts, device="cpu"))
    torch.save({"model": mask_rcnn.state_dict()}, tmp_path / "mask_rcnn.pth")
    cfg = load_predict_config(config, str(tmp_path / "mask_rcnn.pth"), opts, device="cpu")
    with pytest.raises(ExportError, match="mask_on: only box detectors export"):
        export_model(cfg, class_info(cfg), "torchscript", tmp_path / "out")
    assert not (tmp_path / "out" / "export.json").exists()
