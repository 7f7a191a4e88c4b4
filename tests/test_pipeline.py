"""A tiny end-to-end pipeline: pre-train -> bridge -> fine-tune -> evaluate, then reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from direct_pretrain.bridge import BridgeError
from direct_pretrain.outcome import ap_text
from direct_pretrain.pipeline import PhaseStateError, evaluate_weights, run_pipeline

from conftest import tiny_cfg


@pytest.fixture(scope="module")
def finished(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_cfg(synthetic_data, out)
    summary = run_pipeline(cfg)
    return cfg, out, summary


def test_phases_write_checkpoints_metrics_and_summary(finished):
    _, out, summary = finished
    for phase in ("pretrain", "finetune"):
        folder = out / phase
        assert (folder / "model_final.pth").is_file()
        assert (folder / "last_checkpoint").read_text() == "model_final.pth"
        metrics = [json.loads(line) for line in (folder / "metrics.json").read_text().splitlines()]
        assert any("total_loss" in m for m in metrics)
        assert list(folder.glob("events.out.tfevents.*")), f"no TensorBoard events in {folder}"
        done = json.loads((folder / "phase_done.json").read_text())
        assert "AP" in done["results"]["bbox"] and done["iterations"] == 2
    assert (out / "finetune" / "bridged_init.pth").is_file()
    assert (out / "finetune" / "bridged_init_report.json").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for phase in ("PRETRAIN", "FINETUNE"):
        record = summary["phases"][phase]
        assert {"AP", "AP50", "wall_seconds", "iterations"} <= record.keys()
        assert record["wall_seconds"] > 0
    final = torch.load(out / "model_final.pth", weights_only=True)
    finetuned = torch.load(out / "finetune" / "model_final.pth", weights_only=True)
    assert final["model"].keys() == finetuned["model"].keys()
    assert all(torch.equal(final["model"][k], finetuned["model"][k]) for k in final["model"])


def test_finetune_starts_from_the_bridged_pretrained_weights(finished):
    _, out, _ = finished
    pre = torch.load(out / "pretrain" / "model_final.pth", weights_only=True)["model"]
    bridged = torch.load(out / "finetune" / "bridged_init.pth", weights_only=True)["model"]
    key = "backbone.bottom_up.res3.0.conv1.weight"
    assert torch.equal(pre[key], bridged[key])
    trained = torch.load(out / "finetune" / "model_final.pth", weights_only=True)
    assert trained["iteration"] == 1  # fresh counter: 2 iterations of the fine-tune phase


def test_rerun_skips_finished_phases(finished):
    cfg, out, summary = finished
    stamps = {p: (out / p / "model_final.pth").stat().st_mtime_ns for p in ("pretrain", "finetune")}
    again = run_pipeline(cfg)
    assert again["phases"] == summary["phases"]
    assert stamps == {p: (out / p / "model_final.pth").stat().st_mtime_ns for p in stamps}


def test_skip_line_states_the_finished_phase_ap():
    def record(ap: object) -> dict:
        return {"results": {"bbox": {"AP": ap, "AP50": 30.0}}}

    assert ap_text(record(12.345)) == "box AP 12.3"
    assert ap_text(record(None)) == "box AP nan"  # a NaN AP, as JSON keeps it
    assert ap_text({"results": {}}) == "not evaluated"  # e.g. AlignDet's box-domain phase


def test_rerun_with_a_result_changing_config_is_refused(finished):
    cfg, _, _ = finished
    cfg = cfg.clone()
    lr = cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR
    cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR = 0.05
    with pytest.raises(
        PhaseStateError, match=rf"DIRECT_PRETRAIN\.PRETRAIN\.BASE_LR: {lr} -> 0\.05"
    ):
        run_pipeline(cfg)
    cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR = lr
    cfg.DATALOADER.NUM_WORKERS = 1  # does not change results: accepted
    run_pipeline(cfg)


def test_eval_only(finished):
    cfg, out, summary = finished
    results = evaluate_weights(cfg, str(out / "model_final.pth"))
    assert results["bbox"]["AP"] == pytest.approx(summary["phases"]["FINETUNE"]["AP"])
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        evaluate_weights(cfg, str(Path(out) / "nowhere.pth"))
    # The pre-trained model evaluates too (its BN statistics become FrozenBN) ...
    evaluate_weights(cfg, str(out / "pretrain" / "model_final.pth"))
    # ... but a checkpoint of another model is an error naming the keys.
    other = cfg.clone()
    other.MODEL.FPN.OUT_CHANNELS = 48
    with pytest.raises(BridgeError, match=r"fpn_lateral2\.weight: shape"):
        evaluate_weights(other, str(out / "model_final.pth"))


def test_single_phase_runs_need_the_previous_phase(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.PHASE = "FINETUNE"
    with pytest.raises(PhaseStateError, match="PRETRAIN, which has not finished"):
        run_pipeline(cfg)
    cfg.DIRECT_PRETRAIN.PHASE = "PRETRAIN"
    run_pipeline(cfg)
    cfg.DIRECT_PRETRAIN.PHASE = "FINETUNE"
    summary = run_pipeline(cfg)
    assert list(summary["phases"]) == ["FINETUNE"]
    assert (tmp_path / "finetune" / "bridged_init.pth").is_file()


def test_report_is_written(finished):
    _, out, _ = finished
    report = out / "report"
    table = (report / "ap_table.md").read_text()
    assert "| PRETRAIN |" in table and "| FINETUNE |" in table
    for name in ("loss_curves.png", "ap_vs_time.png"):
        assert (report / name).stat().st_size > 1000
    examples = list((report / "examples").glob("*.png"))
    assert len(examples) == 3  # the synthetic validation set has 3 images
    done = json.loads((out / "finetune" / "phase_done.json").read_text())
    assert done["eval_history"] and done["eval_history"][-1]["iteration"] == 2
    index = (report / "index.md").read_text()  # one page: tables and every figure, inline
    assert "| PRETRAIN |" in index and "![loss_curves](loss_curves.png)" in index
    figures = [p.relative_to(report).as_posix() for p in report.rglob("*.*") if p.suffix != ".md"]
    assert figures and all(f"]({f})" in index for f in figures)


def test_report_holds_each_trained_phase_first_batch(finished):
    _, out, _ = finished
    for phase, tiles in (("PRETRAIN", 4), ("FINETUNE", 2)):  # IMS_PER_BATCH, drawn 256 px
        with Image.open(out / "report" / f"batches_{phase}.jpg") as image:
            assert image.format == "JPEG" and image.size == (tiles * 256 + (tiles - 1) * 4, 256)
