"""AlignDet box-domain pre-training: loss, EMA, views, frozen backbone, proposals, transfer."""

from __future__ import annotations

import ast
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from PIL import Image
from torch.nn import functional as F

from direct_pretrain import get_cfg
from direct_pretrain.aligndet import (
    TwoViewMapper,
    box_contrastive_loss,
    chance_contrastive_loss,
    ema_momentum,
    transfer_drop,
)
from direct_pretrain.aligndet.backbone_init import convert_resnet_state
from direct_pretrain.aligndet.dense import (
    BACKGROUND,
    IGNORED,
    centerness_targets,
    fcos_assign,
    sample_anchors,
)
from direct_pretrain.aligndet.proposals import (
    filter_boxes,
    load_proposals,
    max_per_image,
    selective_search,
)
from direct_pretrain.aligndet.views import PHOTOMETRIC_OPS, RandomPhotometric
from direct_pretrain.bridge import BridgeError, bridge_state_dict
from direct_pretrain.config_systems import load_config, phase_config
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.engine import DirectPretrainTrainer
from direct_pretrain.modeling.norm_eval import backbone_norms_eval
from direct_pretrain.phase_kinds import phase_kind
from direct_pretrain.phases import PhaseConfigError

from conftest import ROOT, shrink, tiny_cfg


def reference_box_loss(online, online_ids, target, target_ids, temperature):
    """The public code's loop, literally: per instance, every (key, query) pair is a
    cross-entropy over [key, negatives]; pairs averaged, then instances."""
    online, target = F.normalize(online, dim=1), F.normalize(target, dim=1)
    losses = []
    for c in torch.unique(online_ids):
        if c < 0:
            continue
        query = online[online_ids == c]
        key = target[target_ids == c] if (target_ids == c).any() else query
        neg = torch.cat([online[online_ids != c].detach(), target[target_ids != c]])
        rows = []
        for k in key:
            for q in query:
                logits = torch.cat([(q * k).sum()[None], neg @ q]) / temperature
                rows.append(-torch.log_softmax(logits, 0)[0])
        losses.append(torch.stack(rows).mean())
    return torch.stack(losses).mean()


def test_box_contrastive_loss_matches_the_public_definition():
    gen = torch.Generator().manual_seed(0)
    online = torch.randn(9, 8, generator=gen, requires_grad=True)
    target = torch.randn(7, 8, generator=gen)
    # Instances 0-2, background -1; instance 2 has no target RoI (its queries are its keys).
    online_ids = torch.tensor([0, 0, 1, 2, 2, -1, 1, 0, -1])
    target_ids = torch.tensor([1, 0, -1, 1, 0, 0, 3])
    loss = box_contrastive_loss(online, online_ids, target, target_ids, 0.5)
    expected = reference_box_loss(online, online_ids, target, target_ids, 0.5)
    torch.testing.assert_close(loss, expected)
    grad = torch.autograd.grad(loss, online)[0]
    expected_grad = torch.autograd.grad(expected, online)[0]
    torch.testing.assert_close(grad, expected_grad)
    # A hand-made case: one query, its key identical to it, one orthogonal negative per view:
    # -log(e^2 / (e^2 + 1 + 1)).
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    hand = box_contrastive_loss(
        torch.cat([e0, e1]), torch.tensor([0, 1]), torch.cat([e0, e1]), torch.tensor([0, 1]), 0.5
    )
    assert hand.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    # No instance in view 1: zero, with a graph; one instance, no negative: zero, finite grads.
    empty = box_contrastive_loss(online, torch.full((9,), -1), target, target_ids, 0.5)
    assert empty.item() == 0 and empty.requires_grad
    alone = box_contrastive_loss(online[:2], torch.tensor([0, 0]), target[:0], target_ids[:0], 0.5)
    (g,) = torch.autograd.grad(alone, online)
    assert torch.isfinite(g).all()


def test_chance_level_is_the_loss_of_embeddings_that_tell_nothing_apart():
    online_ids = torch.tensor([0, 0, 1, 2, 2, -1, 1, 0, -1])
    target_ids = torch.tensor([1, 0, -1, 1, 0, 0, 3])
    same = torch.ones(16, 4)  # every similarity equal
    loss = box_contrastive_loss(same[:9], online_ids, same[9:], target_ids, 0.5)
    chance = chance_contrastive_loss(online_ids, target_ids)
    assert chance == pytest.approx(loss.item(), rel=1e-6)
    # Instance 0 has 6 of the 16 RoIs (10 negatives), 1 has 4 (12), 2 has 2 (14).
    assert chance == pytest.approx((math.log(11) + math.log(13) + math.log(15)) / 3)
    assert chance_contrastive_loss(torch.tensor([-1]), target_ids) == 0.0


def test_box_contrastive_loss_under_bfloat16_autocast():
    online = torch.randn(12, 16, requires_grad=True)
    target = torch.randn(10, 16)
    ids1, ids2 = torch.randint(-1, 4, (12,)), torch.randint(-1, 4, (10,))
    ids1[0] = 0
    layer = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embed = layer(online)
        assert embed.dtype == torch.bfloat16
        loss = box_contrastive_loss(embed, ids1, layer(target), ids2, 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(online.grad).all()
    reference = reference_box_loss(layer(online), ids1, layer(target), ids2, 0.5)
    assert loss.item() == pytest.approx(reference.item(), rel=0.05)


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


def test_filter_boxes_is_socos_ratio3size0008():
    node = get_cfg().ALIGNDET.PROPOSALS
    boxes = np.array(
        [
            [0, 0, 32, 32],  # kept: both sides 32 px
            [1, 1, 33, 33],  # duplicate of the first (IoU > 0.5): suppressed by NMS
            [100, 0, 131, 40],  # 31 px wide: dropped
            [0, 100, 96, 132],  # aspect ratio exactly 3: kept
            [0, 140, 100, 173],  # aspect ratio 3.03: dropped
            [20, 20, 180, 180],  # sqrt(area / image area) = 0.8: kept
            [10, 10, 181, 181],  # 0.855 > 0.8: dropped
        ],
        dtype=float,
    )
    kept = filter_boxes(boxes, 200, 200, node)
    assert kept.tolist() == [[0, 0, 32, 32], [0, 100, 96, 132], [20, 20, 180, 180]]
    node = node.clone()
    node.NMS_THRESH = 1.0  # off: every box passing the size and aspect filter stays, in order
    assert len(filter_boxes(boxes, 200, 200, node)) == 4


def test_pseudo_boxes_per_image_follow_the_public_recipes(box_domain_cfg):
    cfg = box_domain_cfg.clone()
    assert cfg.ALIGNDET.PROPOSALS.MAX_PER_IMAGE == -1
    for arch, expected in (("GeneralizedRCNN", 0), ("FCOSDetector", 0), ("RetinaNet", 50)):
        cfg.MODEL.META_ARCHITECTURE = arch
        assert max_per_image(cfg) == expected
    cfg.ALIGNDET.PROPOSALS.MAX_PER_IMAGE = 7
    assert max_per_image(cfg) == 7


def test_proposal_sources(tmp_path, box_domain_cfg):
    rng = np.random.default_rng(0)
    image = (rng.random((96, 128, 3)) * 40).astype(np.uint8)
    image[8:60, 10:70] = 220
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    for mode in ("single", "fast"):
        assert len(selective_search(image[:, :, ::-1], mode)) > 0
    with pytest.raises(ValueError, match="SEARCH_MODE = 'slow'"):
        selective_search(image, "slow")
    dicts = [{"file_name": str(path), "width": 128, "height": 96}]
    node = box_domain_cfg.ALIGNDET.PROPOSALS.clone()
    computed = load_proposals(dicts, node, tmp_path / "cache")
    assert computed[str(path)].shape[1] == 4 and len(computed[str(path)]) > 0
    assert list((tmp_path / "cache" / "proposals").glob("*.json"))  # cached
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"a.png": [[10, 8, 50, 40]]}))  # matched by base name
    node.FILE = str(own)
    assert load_proposals(dicts, node, tmp_path / "cache")[str(path)].tolist() == [[10, 8, 50, 40]]
    own.write_text(json.dumps({"b.png": [[10, 8, 50, 40]]}))
    with pytest.raises(KeyError, match="no boxes for 1 training image"):
        load_proposals(dicts, node, tmp_path / "cache")


def test_photometric_operations_use_the_public_magnitudes():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    image = Image.fromarray(np.stack([ramp] * 3, axis=2))

    def run(op, m):
        return np.asarray(PHOTOMETRIC_OPS[op](image, m))[0, :, 0].astype(int)

    # Solarize at int(256 m / 10): m = 5 inverts pixels >= 128.
    solarized = run("solarize", 5)
    assert solarized[127] == 127 and solarized[128] == 127 and solarized[255] == 0
    # Posterize keeps 4 - int(4 m / 10) bits: 4 bits at m = 1, 1 bit at m = 9.
    assert len(np.unique(run("posterize", 1))) == 16 and len(np.unique(run("posterize", 9))) == 2
    # Enhancement factor 0.1 + 1.8 m / 10: brightness 1.0 (unchanged) at m = 5, 0.28 at m = 1.
    np.testing.assert_array_equal(run("brightness", 5), np.arange(256))
    assert run("brightness", 1)[200] == round(200 * 0.28)
    random.seed(0)
    drawn = {RandomPhotometric().get_transform(None).magnitude for _ in range(300)}
    assert drawn == set(range(1, 10))


def test_transfer_drops_exactly_the_prediction_layers(box_domain_cfg):
    box = phase_config(box_domain_cfg, "BOX_DOMAIN", 8)
    source = DirectPretrainTrainer.build_model(box)
    fine = phase_config(box_domain_cfg, "FINETUNE", 8)
    target = DirectPretrainTrainer.build_model(fine)
    state, report = bridge_state_dict(source.state_dict(), target, drop=transfer_drop(box, fine))
    predictor = {k for k in target.state_dict() if k.startswith("roi_heads.box_predictor.")}
    assert set(report.reinitialised) == predictor and len(predictor) == 4
    assert all(v == "dropped by request" for v in report.reinitialised.values())
    assert {k for k in report.ignored if not k.startswith("target.")} == {
        f"roi_heads.box_predictor.projector.{k}"
        for k in ("0.weight", "0.bias", "2.weight", "2.bias")
    }
    fine.defrost()
    fine.ALIGNDET.KEEP_PREDICTORS = True
    _, kept = bridge_state_dict(source.state_dict(), target, drop=transfer_drop(box, fine))
    # Only the classifier (absent from the box-domain model) is new; the regression is kept.
    assert set(kept.reinitialised) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
    }


def test_unsupported_detector_is_refused(box_domain_cfg):
    box_domain_cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    with pytest.raises(PhaseConfigError, match="ROI_HEADS.NAME = CascadeROIHeads"):
        phase_config(box_domain_cfg, "BOX_DOMAIN", 8)


DETECTOR_CONFIGS = {
    "rcnn": "configs/trees/faster_rcnn_R_18_FPN_aligndet.yaml",
    "retinanet": "configs/trees/retinanet_R_18_FPN_aligndet.yaml",
    "fcos": "configs/trees/fcos_R_18_FPN_aligndet.yaml",
}


def box_domain_phase(name: str, synthetic_data, tmp_path):
    cfg = shrink(load_config(str(ROOT / DETECTOR_CONFIGS[name])), synthetic_data, tmp_path)
    register_datasets(cfg)
    return phase_config(cfg, "BOX_DOMAIN", 8)


@pytest.mark.parametrize("name", list(DETECTOR_CONFIGS))
def test_each_box_domain_detector_trains_in_fp32_and_bfloat16_autocast(
    name, synthetic_data, tmp_path
):
    pcfg = box_domain_phase(name, synthetic_data, tmp_path)
    assert pcfg.MODEL.FPN.NORM == ""  # the public box-domain FPN has no norm
    model = DirectPretrainTrainer.build_model(pcfg)
    model.reset_target()
    batch = next(iter(DirectPretrainTrainer.build_train_loader(pcfg)))
    model.train()
    for autocast in (False, True):
        model.zero_grad()
        with (
            EventStorage() as storage,
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            losses = model(batch)
        assert "loss_contrast" in losses and "loss_box_reg" in losses
        assert storage.latest()["contrast_chance"][0] > 0  # logged beside loss_contrast
        assert all(torch.isfinite(v) for v in losses.values()), losses
        assert losses["loss_contrast"] > 0
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.backbone.bottom_up.parameters())
        assert all(p.grad is None for p in model.target.parameters())
        fpn = [p for n, p in model.backbone.named_parameters() if n.startswith("fpn_")]
        assert all(torch.isfinite(p.grad).all() for p in fpn) and fpn[0].grad.abs().sum() > 0


def _private_names(tree: ast.AST, defined: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2"):
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") or "._" in node.module
            ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if not node.attr.startswith("__") and node.attr not in defined:
                found.append(node.attr)
    return found


def test_aligndet_uses_no_private_detectron2_api():
    """Names like FCOS.match_anchors, _transpose_dense_predictions or
    _dense_box_regression_loss differ between Detectron2 v0.6 and main: none is used."""
    package = ROOT / "projects" / "direct_pretrain"
    trees = {p: ast.parse(p.read_text()) for p in package.rglob("*.py")}
    defined = {
        n.name if isinstance(n, (ast.FunctionDef, ast.ClassDef)) else getattr(n, "attr", "")
        for tree in trees.values()
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        or (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store))
    }
    used = {
        p.name: _private_names(tree, defined) for p, tree in trees.items() if "aligndet" in p.parts
    }
    assert not any(used.values()), used
    removed = ("match_anchors", "compute_ctrness_targets", "label_anchors")
    text = "".join((package / "aligndet" / f).read_text() for f in ("dense.py", "rcnn.py"))
    assert not [name for name in removed if name in text]


def test_own_fcos_assignment_and_centerness_match_detectron2(synthetic_data, tmp_path):
    pcfg = box_domain_phase("fcos", synthetic_data, tmp_path)
    model = DirectPretrainTrainer.build_model(pcfg)
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    anchors = model.anchor_generator([features[f] for f in model.head_in_features])
    gt = Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 2.0, 90.0, 60.0], [0, 0, 9, 9]]))
    inside = fcos_assign(anchors, gt, 0.0)
    sampled = fcos_assign(anchors, gt, 1.5)
    assert (inside >= 0).sum() > (sampled >= 0).sum() > 0  # centre sampling is stricter
    points = Boxes.cat(anchors).get_centers()
    for index in (inside, sampled):
        pos = index >= 0
        box = gt.tensor[index[pos]]
        p = points[pos]
        assert ((p > box[:, :2]) & (p < box[:, 2:])).all()  # every positive is inside its box
        assert ((centerness_targets(p, box) > 0) & (centerness_targets(p, box) <= 1)).all()
    if hasattr(model, "match_anchors"):  # Detectron2 v0.6: its own rule must agree with ours
        instances = Instances((64, 96), gt_boxes=gt)
        torch.testing.assert_close(model.match_anchors(anchors, [instances])[0], sampled)
        pos = sampled >= 0
        reference = model.compute_ctrness_targets(anchors, [gt[sampled.clamp(min=0)]])[0]
        torch.testing.assert_close(
            centerness_targets(points[pos], gt.tensor[sampled[pos]]), reference[pos]
        )


def test_transfer_maps_the_fpn_norm_the_fine_tuning_adds(box_domain_cfg):
    box_domain_cfg.DIRECT_PRETRAIN.FINETUNE.FPN_NORM = "GN"
    box = phase_config(box_domain_cfg, "BOX_DOMAIN", 8)
    source = DirectPretrainTrainer.build_model(box)
    fine = phase_config(box_domain_cfg, "FINETUNE", 8)
    target = DirectPretrainTrainer.build_model(fine)
    state, report = bridge_state_dict(source.state_dict(), target, drop=transfer_drop(box, fine))
    norms = {k for k in target.state_dict() if k.startswith("backbone.fpn_") and ".norm." in k}
    assert norms and norms <= set(report.reinitialised)
    assert report.ignored["backbone.fpn_lateral2.bias"] == "not in the target model"
    conv = "backbone.fpn_output3.weight"
    assert conv in report.loaded and torch.equal(state[conv], source.state_dict()[conv])


def test_backbone_norm_eval_trains_affine_keeps_statistics(box_domain_cfg):
    node = box_domain_cfg.DIRECT_PRETRAIN.FINETUNE
    node.BACKBONE_NORM, node.BACKBONE_NORM_EVAL = "BN", True
    model = DirectPretrainTrainer.build_model(phase_config(box_domain_cfg, "FINETUNE", 8))
    model.train()
    assert backbone_norms_eval(model) > 0
    bn = next(m for m in model.backbone.bottom_up.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    out = model.backbone(torch.randn(2, 3, 64, 64) * 50)
    sum(v.mean() for v in out.values()).backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None
    assert model.backbone.fpn_lateral2.training  # only the backbone body is affected


def _torchvision_state(depth: int) -> dict:
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    gen = torch.Generator().manual_seed(depth)
    for m in net.modules():  # statistics other than the init's 0/1, so the test can fail
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval(), net.state_dict()


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_and_moco_resnets_convert_to_the_same_features(depth):
    net, state = _torchvision_state(depth)
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}, "epoch": 3}
    moco["state_dict"].update({f"module.encoder_k.{k}": v for k, v in state.items()})
    moco["state_dict"]["module.encoder_q.fc.0.weight"] = torch.zeros(2, 2)
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    body = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    for source in (state, moco):
        converted, report = convert_resnet_state(source, input_format="BGR")
        prefix = "backbone.bottom_up."
        expected = {prefix + k for k in body.state_dict()}
        assert set(converted) == expected
        body_keys = [k for k in report.ignored if "encoder_q" in k and ".fc." not in k]
        assert all(k.endswith("num_batches_tracked") for k in body_keys)
        body.load_state_dict({k[len(prefix) :]: v for k, v in converted.items()})
        rgb = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            reference = torch.nn.Sequential(*list(net.children())[:-2])(rgb)
            ours = body(rgb.flip(1))["res5"]  # Detectron2 reads BGR
        torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3)


def test_box_domain_init_from_a_users_backbone_checkpoint(box_domain_cfg, tmp_path):
    _, state = _torchvision_state(18)
    weights = tmp_path / "resnet18_moco.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}, weights)
    node = box_domain_cfg.DIRECT_PRETRAIN.BOX_DOMAIN
    node.INIT = "weights"
    box_domain_cfg.MODEL.WEIGHTS = str(weights)
    box_domain_cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    pcfg = phase_config(box_domain_cfg, "BOX_DOMAIN", 8)
    ready = phase_kind("BOX_DOMAIN").prepare_weights(pcfg)
    assert ready.MODEL.WEIGHTS != str(weights)
    report = json.loads(Path(ready.MODEL.WEIGHTS.replace(".pth", "_report.json")).read_text())
    assert len(report["conversion"]["renamed"]) == len(
        [k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    )
    assert report["bridge"]["reinitialised"]  # FPN and heads: fresh, reported
    model = DirectPretrainTrainer.build_model(ready)
    DetectionCheckpointer(model).load(ready.MODEL.WEIGHTS)
    torch.testing.assert_close(
        model.backbone.bottom_up.res3[0].conv2.weight, state["layer2.0.conv2.weight"]
    )
    box_domain_cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True
    with pytest.raises(BridgeError, match="STRIDE_IN_1X1 False"):
        phase_kind("BOX_DOMAIN").prepare_weights(phase_config(box_domain_cfg, "BOX_DOMAIN", 8))


def _proposal_worker(dicts: list[dict], node, folder: str, fail_on_main: bool) -> None:
    """Counts this rank's selective-search calls; records what load_proposals returned."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from direct_pretrain.aligndet import proposals

    rank, search = comm.get_rank(), proposals.selective_search

    def counted(*args, **kwargs):
        with open(f"{folder}/searched_rank{rank}", "a") as f:
            f.write("x")
        if fail_on_main and rank == 0:
            raise OSError("disk on fire")
        return search(*args, **kwargs)

    proposals.selective_search = counted
    try:
        boxes = proposals.load_proposals(dicts, node, Path(folder) / "cache")
        outcome = {"boxes": {k: v.tolist() for k, v in boxes.items()}}
    except Exception as e:  # noqa: BLE001 - the test checks which error each rank saw
        outcome = {"error": f"{type(e).__name__}: {e}"}
    Path(f"{folder}/outcome_rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()
    # No Python finalisation: gloo threads still referenced then can abort the process (seen
    # on a loaded machine, after the outcome was written).
    os._exit(0)


@pytest.mark.parametrize("fail_on_main", [False, True])
def test_pseudo_boxes_are_computed_once_by_rank_0(box_domain_cfg, tmp_path, fail_on_main):
    from detectron2.data import DatasetCatalog
    from detectron2.engine import launch

    dicts = DatasetCatalog.get("tiny_train")[:3]
    node = box_domain_cfg.ALIGNDET.PROPOSALS.clone()
    launch(_proposal_worker, 2, dist_url="auto", args=(dicts, node, str(tmp_path), fail_on_main))
    outcomes = [json.loads((tmp_path / f"outcome_rank{r}.json").read_text()) for r in (0, 1)]
    assert not (tmp_path / "searched_rank1").exists()  # rank 1 never searched
    if fail_on_main:
        assert outcomes[0]["error"] == "OSError: disk on fire"
        assert outcomes[1]["error"].startswith("MainProcessError: AlignDet selective search")
        assert "disk on fire" in outcomes[1]["error"]
    else:
        assert len((tmp_path / "searched_rank0").read_text()) == len(dicts)
        assert outcomes[0] == outcomes[1] and len(outcomes[0]["boxes"]) == len(dicts)


def test_dense_sampling_takes_positives_first_then_background_never_ignored():
    assigned = torch.tensor([IGNORED] * 5 + [BACKGROUND] * 10 + [0, 1, 1, 2])
    few = sample_anchors(assigned, 6)
    assert len(few) == 6 and (assigned[few] >= 0).sum() == 4
    assert (assigned[few] != IGNORED).all()
    many = sample_anchors(assigned, 100)  # fewer candidates than asked: all of them
    assert sorted(many.tolist()) == list(range(5, 19))
    only_positives = sample_anchors(assigned, 3)
    assert (assigned[only_positives] >= 0).all() and len(only_positives) == 3
