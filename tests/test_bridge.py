"""The checkpoint bridge: key report, norm conversion, class-count change, wrong models."""

from __future__ import annotations

import json

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.structures import ImageList

from direct_pretrain.bridge import (
    BridgeError,
    bridge_checkpoint,
    bridge_state_dict,
    report_path,
    resize_position_table,
)
from direct_pretrain.config_systems import phase_config
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.modeling import TimmSwin

from conftest import tiny_cfg


@pytest.fixture
def phases(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    register_datasets(cfg)
    return cfg, phase_config(cfg, "PRETRAIN", 8), phase_config(cfg, "FINETUNE", 8)


def _trained_source(pre_cfg):
    """A pre-train model whose BN statistics and weights are not at their init values."""
    model = DirectPretrainTrainer.build_model(pre_cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _with(cfg, **changes):
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg.freeze()
    return cfg


def test_report_accounts_for_every_key(phases, tmp_path):
    _, pre, fine = phases
    source = _trained_source(pre)
    DetectionCheckpointer(source, str(tmp_path)).save("src")
    target = DirectPretrainTrainer.build_model(fine)
    report = bridge_checkpoint(tmp_path / "src.pth", target, tmp_path / "bridged.pth")
    target_keys = set(target.state_dict())
    converted_keys = {k for k in target_keys if k.rpartition(".")[0] in report.converted}
    assert set(report.loaded) | converted_keys == target_keys
    assert not report.reinitialised
    # FrozenBN has no step counter: each BN's counter is reported as ignored, nothing else.
    assert set(report.ignored) == {f"{m}.num_batches_tracked" for m in report.converted}
    assert all(v == "BatchNorm -> FrozenBatchNorm2d" for v in report.converted.values())
    saved = json.loads(report_path(tmp_path / "bridged.pth").read_text())
    assert len(saved["loaded"]) == len(report.loaded)
    bridged = torch.load(tmp_path / "bridged.pth", weights_only=True)
    assert set(bridged["model"]) == target_keys and "optimizer" not in bridged


def test_bn_to_frozen_bn_preserves_eval_outputs(phases):
    _, pre, fine = phases
    source = _trained_source(pre)
    target = DirectPretrainTrainer.build_model(fine).eval()
    state, _ = bridge_state_dict(source.state_dict(), target)
    target.load_state_dict(state)
    images = ImageList.from_tensors([torch.rand(3, 64, 64) * 255], 32)
    with torch.no_grad():
        x = source.preprocess_image([{"image": images.tensor[0]}]).tensor
        a, b = source.backbone(x), target.backbone(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_class_count_change_reinitialises_only_the_predictor(phases):
    _, pre, fine = phases
    source = _trained_source(pre)
    target = DirectPretrainTrainer.build_model(_with(fine, **{"MODEL.ROI_HEADS.NUM_CLASSES": 3}))
    state, report = bridge_state_dict(source.state_dict(), target)
    assert set(report.reinitialised) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
    }
    assert all("class count changed" in why for why in report.reinitialised.values())
    key = "roi_heads.box_head.fc1.weight"
    assert torch.equal(state[key], source.state_dict()[key])
    with pytest.raises(BridgeError, match="cls_score.weight: shape"):
        bridge_state_dict(source.state_dict(), target, reinit_on_class_change=False)


def test_checkpoint_of_another_architecture_names_the_keys(phases):
    _, pre, fine = phases
    source = _trained_source(pre)
    target = DirectPretrainTrainer.build_model(_with(fine, **{"MODEL.FPN.OUT_CHANNELS": 48}))
    with pytest.raises(BridgeError, match=r"backbone\.fpn_lateral2\.weight: shape"):
        bridge_state_dict(source.state_dict(), target)
    deeper = DirectPretrainTrainer.build_model(_with(fine, **{"MODEL.RESNETS.DEPTH": 34}))
    with pytest.raises(BridgeError, match=r"res2\.2\.conv1\.weight: missing from the checkpoint"):
        bridge_state_dict(source.state_dict(), deeper)


def test_statistics_cannot_become_group_norm(phases):
    _, pre, fine = phases
    source = _trained_source(pre)
    target = DirectPretrainTrainer.build_model(_with(fine, **{"MODEL.RESNETS.NORM": "GN"}))
    with pytest.raises(BridgeError, match="cannot become GroupNorm"):
        bridge_state_dict(source.state_dict(), target)


def test_unreadable_checkpoint_is_named(phases, tmp_path):
    _, _, fine = phases
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    target = DirectPretrainTrainer.build_model(fine)
    with pytest.raises(BridgeError, match="broken.pth"):
        bridge_checkpoint(bad, target, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_swin_window_change_resizes_position_tables():
    small = TimmSwin("swin_tiny_patch4_window7_224", 7, 0.0, ["res2", "res3", "res4", "res5"])
    large = TimmSwin("swin_tiny_patch4_window7_224", 12, 0.0, ["res2", "res3", "res4", "res5"])
    state, report = bridge_state_dict(small.state_dict(), large)
    before, after = small.state_dict(), large.state_dict()
    # timm caps the window at a stage's resolution (7 at the last stage of a 224 input).
    resized = {
        k
        for k in after
        if k.endswith("relative_position_bias_table") and after[k].shape != before[k].shape
    }
    assert len(resized) == 10 and set(report.converted) == resized
    assert all("13x13 -> 23x23" in v for v in report.converted.values())
    assert all(state[k].shape == after[k].shape for k in resized)
    large.load_state_dict(state)
    # Same window: nothing to convert, every weight copied as it is.
    state, report = bridge_state_dict(small.state_dict(), small)
    assert not report.converted and len(report.loaded) == len(small.state_dict())


def test_position_table_resize_keeps_a_smooth_table():
    side = 13
    ramp = torch.linspace(0, 1, side).repeat(side, 1)  # bias grows left to right
    table = ramp.reshape(-1, 1).repeat(1, 2)
    resized, note = resize_position_table(table, torch.Size([23 * 23, 2]))
    grid = resized[:, 0].reshape(23, 23)
    assert "13x13 -> 23x23" in note
    assert torch.all(grid[:, 1:] >= grid[:, :-1] - 1e-4)  # still increasing left to right
    assert grid[:, 0].mean() < 0.05 and grid[:, -1].mean() > 0.95
