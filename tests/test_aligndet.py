"""AlignDet box-domain pre-training: loss, EMA, views, frozen backbone, proposals, transfer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.utils.events import EventStorage
from PIL import Image

from direct_pretrain import get_cfg
from direct_pretrain.aligndet import TwoViewMapper, ema_momentum, info_nce, transfer_drop
from direct_pretrain.aligndet.proposals import filter_boxes, load_proposals, selective_search
from direct_pretrain.bridge import bridge_state_dict
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.phases import PhaseConfigError, phase_config
from direct_pretrain.trainer import DirectPretrainTrainer

from conftest import tiny_cfg


def test_info_nce_on_hand_made_embeddings():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([e0, e1])
    # Query = instance 0: positive logit 1/0.5, target negative 0, own view-1 key excluded,
    # view-1 negative 0  ->  -log(e^2 / (e^2 + 1 + 1)).
    loss = info_nce(e0[None], torch.tensor([0]), keys, keys, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    # A query pointing at the wrong instance costs more; averaging is over queries.
    worse = info_nce(e1[None], torch.tensor([0]), keys, keys, temperature=0.5)
    both = info_nce(torch.stack([e0, e1]), torch.tensor([0, 0]), keys, keys, temperature=0.5)
    assert worse > loss and both.item() == pytest.approx((loss + worse).item() / 2, abs=1e-6)
    assert info_nce(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), keys, keys, 0.5) == 0


def test_ema_momentum_schedule():
    assert ema_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert ema_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert ema_momentum(0.996, 100, 100) == pytest.approx(1.0)


@pytest.fixture
def box_domain_cfg(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.PIPELINE = ["PRETRAIN", "BOX_DOMAIN", "FINETUNE"]
    register_datasets(cfg)
    return cfg


def test_box_domain_model_ema_and_frozen_backbone(box_domain_cfg):
    pcfg = phase_config(box_domain_cfg, "BOX_DOMAIN", 8)
    assert pcfg.MODEL.META_ARCHITECTURE == "AlignDetRCNN" and not pcfg.MODEL.MASK_ON
    model = DirectPretrainTrainer.build_model(pcfg)
    model.reset_target()
    fpn_w = model.backbone.fpn_lateral3.weight
    target_w = model.target["backbone"].fpn_lateral3.weight
    assert torch.equal(fpn_w, target_w)
    with torch.no_grad():
        fpn_w.add_(1.0)
    before = target_w.clone()
    model.update_target(0.9)
    torch.testing.assert_close(target_w, 0.9 * before + 0.1 * fpn_w)

    batch = next(iter(DirectPretrainTrainer.build_train_loader(pcfg)))
    model.train()
    with EventStorage():
        losses = model(batch)
    assert {"loss_contrast", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= losses.keys()
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.bottom_up.parameters())
    assert all(p.grad is None for p in model.target.parameters())
    assert model.backbone.fpn_lateral3.weight.grad.abs().sum() > 0
    assert model.roi_heads.box_predictor.projector[0].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no classifier"):
        model.eval()(batch)


def test_views_keep_pseudo_boxes_on_the_same_content(monkeypatch):
    image = np.zeros((80, 120, 3), dtype=np.uint8)
    image[10:30, 20:60] = 255  # the object: a white rectangle
    monkeypatch.setattr(detection_utils, "read_image", lambda *args, **kwargs: image)
    mapper = TwoViewMapper(
        {"x.png": np.array([[20, 10, 60, 30], [0, 0, 2, 2.0]])},
        [T.ResizeShortestEdge((40, 120), 200), T.RandomFlip()],
        "BGR",
        4.0,
    )
    views = [mapper({"file_name": "x.png"}) for _ in range(8)]
    sizes = set()
    for out in views:
        for name in ("view1", "view2"):
            view = out[name]
            boxes = view["instances"].gt_boxes.tensor
            assert len(boxes) == 1  # the 2x2 box is dropped from both views
            x0, y0, x1, y1 = boxes[0].round().int().tolist()
            inside = view["image"][:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].float()
            assert inside.mean() > 250  # the box still covers the white rectangle
            sizes.add(tuple(view["image"].shape[1:]))
    assert len(sizes) > 1  # views are resized independently


def test_filter_boxes_rules():
    node = get_cfg().ALIGNDET.PROPOSALS
    boxes = np.array(
        [
            [0, 0, 50, 50],  # kept
            [1, 1, 51, 51],  # duplicate of the first (IoU > 0.5): suppressed
            [0, 0, 100, 10],  # aspect ratio 10: dropped
            [0, 0, 0.5, 0.5],  # below the minimum relative size: dropped
            [60, 60, 120, 100],  # kept
        ],
        dtype=float,
    )
    kept = filter_boxes(boxes, 200, 200, node)
    assert kept.tolist() == [[0, 0, 50, 50], [60, 60, 120, 100]]


def test_proposal_sources(tmp_path, box_domain_cfg):
    rng = np.random.default_rng(0)
    image = (rng.random((64, 96, 3)) * 40).astype(np.uint8)
    image[8:40, 10:50] = 220
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    assert len(selective_search(image[:, :, ::-1], 512)) > 0
    dicts = [{"file_name": str(path), "width": 96, "height": 64}]
    node = box_domain_cfg.ALIGNDET.PROPOSALS.clone()
    computed = load_proposals(dicts, node, tmp_path / "cache")
    assert computed[str(path)].shape[1] == 4
    assert list((tmp_path / "cache" / "proposals").glob("*.json"))  # cached
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"a.png": [[10, 8, 50, 40]]}))  # matched by base name
    node.FILE = str(own)
    assert load_proposals(dicts, node, tmp_path / "cache")[str(path)].tolist() == [[10, 8, 50, 40]]
    own.write_text(json.dumps({"b.png": [[10, 8, 50, 40]]}))
    with pytest.raises(KeyError, match="no boxes for 1 training image"):
        load_proposals(dicts, node, tmp_path / "cache")


def test_transfer_drops_exactly_the_prediction_layers(box_domain_cfg):
    source = DirectPretrainTrainer.build_model(phase_config(box_domain_cfg, "BOX_DOMAIN", 8))
    fine = phase_config(box_domain_cfg, "FINETUNE", 8)
    target = DirectPretrainTrainer.build_model(fine)
    state, report = bridge_state_dict(source.state_dict(), target, drop=transfer_drop(fine))
    predictor = {k for k in target.state_dict() if k.startswith("roi_heads.box_predictor.")}
    assert set(report.reinitialised) == predictor and len(predictor) == 4
    assert all(v == "dropped by request" for v in report.reinitialised.values())
    assert {k for k in report.ignored if not k.startswith("target.")} == {
        f"roi_heads.box_predictor.projector.{k}"
        for k in ("0.weight", "0.bias", "2.weight", "2.bias")
    }
    fine.defrost()
    fine.ALIGNDET.KEEP_PREDICTORS = True
    _, kept = bridge_state_dict(source.state_dict(), target, drop=transfer_drop(fine))
    # Only the classifier (absent from the box-domain model) is new; the regression is kept.
    assert set(kept.reinitialised) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
    }


def test_unsupported_detector_is_refused(box_domain_cfg):
    box_domain_cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    with pytest.raises(PhaseConfigError, match="ROI_HEADS.NAME = CascadeROIHeads"):
        phase_config(box_domain_cfg, "BOX_DOMAIN", 8)
