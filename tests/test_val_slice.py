"""Never end worse: a validation slice carved out of the training set, and the run's final model
chosen on it among the detector phases."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog

from direct_pretrain import final_choice
from direct_pretrain.config_systems import load_config, system_of
from direct_pretrain.data.val_slice import held_out, slice_size
from direct_pretrain.final_choice import hold_out_val_slice
from direct_pretrain.outcome import worse_than_earlier
from direct_pretrain.pipeline import prepare_config, run_pipeline
from direct_pretrain.predict import load_run

from conftest import ROOT, shrink, synthetic_splits, tiny_cfg


@pytest.fixture(scope="module")
def data24(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A synthetic training set of 24 images (enough for a slice) and a test set of 3."""
    return synthetic_splits(tmp_path_factory.mktemp("data24"), 24, 2)


def test_slice_sizes():
    assert slice_size(19, 0.5, 50) == 0  # too small a training set: no slice
    assert slice_size(24, 0.1, 50) == 2
    assert slice_size(30, 0.01, 50) == 1
    assert slice_size(5000, 0.1, 50) == 50
    assert slice_size(5000, 0.0, 50) == 0


def test_slice_is_deterministic_disjoint_and_stated(data24, tmp_path, caplog):
    cfg = tiny_cfg(data24, tmp_path)
    system = system_of(cfg)
    cfg, num_images = prepare_config(cfg)
    with caplog.at_level(logging.INFO):
        reduced, num_train, val_slice = hold_out_val_slice(system, cfg, num_images)
    assert (val_slice.images, val_slice.total, num_train) == (2, 24, 22)
    assert (
        "Validation slice: 2 of 24 training images held out (from tiny_train) to choose the final "
        "model; DIRECT_PRETRAIN.VAL_SLICE 0 turns it off." in caplog.messages
    )
    assert system.split_names(reduced)[0] == list(val_slice.train_names)
    train = {d["file_name"] for d in DatasetCatalog.get(val_slice.train_names[0])}
    held = {d["file_name"] for d in DatasetCatalog.get(val_slice.name)}
    assert len(held) == 2 and not train & held and len(train | held) == 24
    coco = json.loads(Path(val_slice.json_file).read_text())
    assert {Path(i["file_name"]).name for i in coco["images"]} == {Path(f).name for f in held}
    # The same images whatever the order of the dataset and wherever it lives.
    dicts, root = system.train_dicts(cfg), data24["train"][1]
    chosen = [d["file_name"] for d in held_out(dicts, 5, [root])]
    assert [d["file_name"] for d in held_out(dicts[::-1], 5, [root])] == chosen
    moved = [{**d, "file_name": d["file_name"].replace(root, "/elsewhere")} for d in dicts]
    assert [d["file_name"] for d in held_out(moved, 5, ["/elsewhere"])] == [
        f.replace(root, "/elsewhere") for f in chosen
    ]
    # Carving again (a rerun) gives the same dataset names: the phase folders accept them.
    again, _, _ = hold_out_val_slice(system, cfg, num_images)
    assert system.split_names(again) == system.split_names(reduced)


def _model(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_a_run_ends_with_the_phase_that_scores_best_on_the_slice(
    data24, tmp_path, caplog, monkeypatch
):
    cfg = tiny_cfg(data24, tmp_path)
    summary = run_pipeline(cfg)
    held = summary["val_slice"]
    assert held["images"] == 2 and held["of"] == 24 and held["from"] == ["tiny_train"]
    assert set(held["box_ap"]) == set(held["eval_seconds"]) == {"PRETRAIN", "FINETUNE"}
    assert held["reused"] == []
    for phase in ("pretrain", "finetune"):
        assert (tmp_path / phase / "val_slice" / "inference").is_dir()
        ran = yaml.safe_load((tmp_path / phase / "phase_config.yaml").read_text())
        assert ran["DATASETS"]["TRAIN"] == [
            held["dataset"].replace("val-slice", "tiny_train-without-val-slice")
        ]
    # Whatever the tiny models score, make the fine-tune the worse one on the slice: the
    # pre-trained model finds every box, the fine-tuned one nothing.
    slice_gt = json.loads((tmp_path / "val_slice_coco.json").read_text())

    def detect(phase: str, images: set, ap: float) -> None:
        boxes = [
            {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9}
            for a in slice_gt["annotations"]
            if a["image_id"] in images
        ]
        found = tmp_path / phase / "val_slice" / "inference" / "coco_instances_results.json"
        found.write_text(json.dumps(boxes))
        cache = tmp_path / phase / "val_slice_eval.json"
        saved = json.loads(cache.read_text())
        saved["results"]["bbox"]["AP"] = ap
        cache.write_text(json.dumps(saved))

    every = {image["id"] for image in slice_gt["images"]}
    detect("pretrain", every, 100.0)
    detect("finetune", set(), 0.0)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the slice evaluation saved in the phase folder is not reused")

    monkeypatch.setattr(final_choice, "evaluate_on_slice", no_evaluation)
    with caplog.at_level(logging.INFO):
        summary = run_pipeline(cfg)  # the same command: every phase is skipped
    message = (
        "Phase FINETUNE ends below phase PRETRAIN on the validation slice (AP 0.0 vs 100.0, ahead "
        "on every leave-one-out of its 2 images by the same margin): the run's final model is "
        "PRETRAIN's (both kept in their folders)"
    )
    assert message in caplog.messages and message in summary["warnings"]
    assert summary["final_phase"] == "PRETRAIN"
    assert summary["val_slice"]["box_ap"] == {"PRETRAIN": 100.0, "FINETUNE": 0.0}
    assert summary["val_slice"]["reused"] == ["PRETRAIN", "FINETUNE"]
    assert json.loads((tmp_path / "summary.json").read_text())["final_phase"] == "PRETRAIN"
    final, pre = _model(tmp_path / "model_final.pth"), _model(
        tmp_path / "pretrain" / "model_final.pth"
    )
    assert final.keys() == pre.keys() and all(torch.equal(final[k], pre[k]) for k in final)
    assert (tmp_path / "finetune" / "model_final.pth").is_file()
    predict = yaml.safe_load((tmp_path / "config_predict.yaml").read_text())
    assert predict["INPUT"]["MIN_SIZE_TEST"] == 32  # the pre-train phase's test size
    assert predict["MODEL"]["RESNETS"]["NORM"] == "BN"
    threshold = tmp_path / "predict_threshold.json"
    assert not threshold.is_file() or json.loads(threshold.read_text())["phase"] == "PRETRAIN"
    index = (tmp_path / "report" / "index.md").read_text()
    assert "**Final model: PRETRAIN's, not the last phase's**" in index and message in index
    assert load_run(tmp_path, device="cpu").INPUT.MIN_SIZE_TEST == 32  # predict.py --run
    # Within the slice's noise, the last phase's model stays the run's: it finds the boxes of one
    # of the two images (AP 100 vs 50, but leaving out either image moves the gap from 0 to 100)
    detect("finetune", {min(every)}, 50.0)
    with caplog.at_level(logging.INFO):
        assert run_pipeline(cfg)["final_phase"] == "FINETUNE"
    noise = "standard errors of the paired jackknife over its 2 images, within 2: the slice's"
    assert any(noise in m for m in caplog.messages)
    # An evaluation interrupted before its file was written, or of another model, is redone.
    (tmp_path / "pretrain" / "val_slice_eval.json").unlink()
    cache = tmp_path / "finetune" / "val_slice_eval.json"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "model": "another model"}))
    evaluated = []

    def fake_evaluation(system, cfg, phase, weights):
        evaluated.append(phase)
        return {"bbox": {"AP": {"PRETRAIN": 5.0, "FINETUNE": 60.0}[phase]}}

    monkeypatch.setattr(final_choice, "evaluate_on_slice", fake_evaluation)
    summary = run_pipeline(cfg)
    assert evaluated == ["PRETRAIN", "FINETUNE"] and summary["val_slice"]["reused"] == []
    assert summary["final_phase"] == "FINETUNE" and summary["warnings"] == []
    final, tuned = _model(tmp_path / "model_final.pth"), _model(
        tmp_path / "finetune" / "model_final.pth"
    )
    assert all(torch.equal(final[k], tuned[k]) for k in final)


def test_the_test_set_warning_names_the_final_model_chosen_on_the_slice():
    phases = {"PRETRAIN": {"AP": 12.0}, "FINETUNE": {"AP": 14.0}}
    (warning,) = worse_than_earlier(phases, ["v"], "PRETRAIN")
    assert warning.startswith(
        "Phase PRETRAIN, chosen on the validation slice, ends below phase FINETUNE on v: box AP "
        "12.0 against 14.0. model_final.pth is the PRETRAIN model;"
    )
    assert worse_than_earlier(phases, ["v"], "FINETUNE") == []


def test_val_slice_0_trains_on_the_whole_training_set(data24, tmp_path, caplog):
    cfg = tiny_cfg(data24, tmp_path)
    cfg.DIRECT_PRETRAIN.VAL_SLICE = 0.0
    cfg.DIRECT_PRETRAIN.PHASE = "PRETRAIN"
    with caplog.at_level(logging.INFO):
        summary = run_pipeline(cfg)
    assert any(
        m.startswith("No validation slice (DIRECT_PRETRAIN.VAL_SLICE 0") for m in caplog.messages
    )
    assert summary["final_phase"] == "PRETRAIN" and summary["val_slice"] is None
    assert not list(tmp_path.rglob("val_slice*"))
    keys = json.loads((tmp_path / "pretrain" / "phase_keys.json").read_text())
    assert keys["DATASETS.TRAIN"] == ["tiny_train"]
    assert keys["SOLVER.MAX_ITER"] == 2


def test_lazyconfig_runs_choose_on_the_slice_too(data24, tmp_path):
    cfg = shrink(
        load_config(str(ROOT / "configs/trees/faster_rcnn_R_18_FPN_direct.py")), data24, tmp_path
    )
    summary = run_pipeline(cfg)
    held = summary["val_slice"]
    assert held["images"] == 2 and set(held["box_ap"]) == {"PRETRAIN", "FINETUNE"}
    scores = {p: -1.0 if ap is None else ap for p, ap in held["box_ap"].items()}
    expected = "PRETRAIN" if scores["PRETRAIN"] > scores["FINETUNE"] else "FINETUNE"
    assert summary["final_phase"] == expected
    for phase in ("pretrain", "finetune"):
        keys = json.loads((tmp_path / phase / "phase_keys.json").read_text())
        assert keys["dataloader.train.dataset.names"] == [f"tiny_train-without-{held['dataset']}"]
        assert (tmp_path / phase / "val_slice" / "inference").is_dir()
        assert (tmp_path / phase / "inference" / "coco_instances_results.json").is_file()
    final = _model(tmp_path / "model_final.pth")
    chosen = _model(tmp_path / expected.lower() / "model_final.pth")
    assert all(torch.equal(final[k], chosen[k]) for k in final)


def test_a_planned_fine_tune_scale_is_measured_on_the_slice(data24, tmp_path, caplog):
    cfg = tiny_cfg(data24, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.3
    cfg.freeze()
    with caplog.at_level(logging.INFO):
        summary = run_pipeline(cfg, user_keys={})
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    measured = plan["replanned"]["FINETUNE"]["measured"]
    assert measured["phase"] == "PRETRAIN" and "2-image validation slice" in measured["figure"]
    assert measured["figure"].count("; ") == 2  # three candidate scales
    ran = yaml.safe_load((tmp_path / "finetune" / "phase_config.yaml").read_text())
    scale = plan["replanned"]["FINETUNE"].get("scale", plan["scales"]["FINETUNE"])
    assert ran["INPUT"]["MIN_SIZE_TEST"] == 32 * round(64 * scale / 32)
    assert any("validation slice" in m and m.startswith("Plan: ") for m in caplog.messages)
    assert summary["budget"]["measured"]["FINETUNE"]["figure"] == measured["figure"]
    measuring = plan["replanned"]["FINETUNE"]["planning_seconds"]  # the slice's evaluations
    assert summary["budget"]["planning_seconds"] == round(plan["planning_seconds"] + measuring, 1)
    index = (tmp_path / "report" / "index.md").read_text()
    assert f"FINETUNE scale x{scale:.2f}: " in index
