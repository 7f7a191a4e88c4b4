"""Box-domain pre-training of one-stage detectors: ``AlignDetRetinaNet`` and ``AlignDetFCOS``.

As the public code (liming-ai/AlignDet: ``SelfSupRetinaHead.loss``, ``SelfSupFCOSHead.loss``,
``configs/_base_/models/selfsup_{retinanet,fcos}_r50_fpn.py``): the classifier becomes a
per-anchor (per-point) fc-ReLU-fc embedding (RetinaNet 1x1-ReLU-1x1, FCOS 3x3-ReLU-1x1
convolutions); the online detector runs on view 1 and the EMA target on view 2, each assigning
its anchors to the pseudo-boxes of its view and sampling, positives first, background filling
the rest (RetinaNet: ``ALIGNDET.RETINANET_SAMPLES_PER_IMAGE`` per image, IoU 0.5/0.4; FCOS:
``ALIGNDET.FCOS_SAMPLES_PER_BATCH`` over the batch, points inside a pseudo-box within the
level's scale range). :func:`box_contrastive_loss` runs on the sampled anchors of both views
(background anchors are negatives of every instance). Regression of the sampled online
positives: RetinaNet L1 on the deltas; FCOS IoU loss (-log IoU) weighted by the centerness
targets, plus centerness BCE.

Only public Detectron2 API is used (the same in v0.6 and main): the detectors' attributes
(``backbone``, ``head``, ``head_in_features``, ``anchor_generator``, ``box2box_transform``,
``anchor_matcher``) and :func:`pairwise_iou` / :func:`pairwise_point_box_distance`; the
prediction transposition, FCOS assignment and centerness targets are our own.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.structures import Boxes, pairwise_iou, pairwise_point_box_distance
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from ..modeling.fcos import FCOSDetector
from .losses import box_contrastive_loss, chance_contrastive_loss
from .rcnn import box_domain_args
from .target import EMATargetMixin

__all__ = [
    "AlignDetFCOS",
    "AlignDetRetinaNet",
    "centerness_targets",
    "fcos_assign",
    "sample_anchors",
    "transpose_dense",
]

# Per-anchor assignment: >= 0 a pseudo-box index; BACKGROUND; IGNORED (never sampled).
BACKGROUND, IGNORED = -1, -2


def transpose_dense(predictions: list[list[torch.Tensor]], dims: list[int]) -> list[torch.Tensor]:
    """Per output, the levels' (N, A*K, H, W) maps as one (N, sum H*W*A, K) tensor."""
    out = []
    for levels, k in zip(predictions, dims):
        out.append(
            cat(
                [
                    x.view(x.shape[0], -1, k, *x.shape[2:]).permute(0, 3, 4, 1, 2).flatten(1, 3)
                    for x in levels
                ],
                dim=1,
            )
        )
    return out


def fcos_assign(anchors: list[Boxes], gt_boxes: Boxes, radius: float) -> torch.Tensor:
    """FCOS assignment of points to boxes: (R,) box index per point, BACKGROUND if none.

    A point (an anchor box of the level's stride size) is positive for a box if it lies inside
    it (and, with ``radius`` > 0, within ``radius`` strides of its centre) and its largest
    distance to the box's sides is in the level's range (4-8 strides; 0 below the first level,
    unbounded above the last); among several boxes the smallest wins.
    """
    counts = [len(a) for a in anchors]
    points = Boxes.cat(anchors)
    if len(gt_boxes) == 0:
        return torch.full((len(points),), BACKGROUND, dtype=torch.long, device=points.device)
    centers = points.get_centers()
    strides = points.tensor[:, 2] - points.tensor[:, 0]
    low, high = strides * 4, strides * 8
    low[: counts[0]] = 0
    high[-counts[-1] :] = float("inf")
    distances = pairwise_point_box_distance(centers, gt_boxes)  # (R, M, 4)
    match = distances.min(dim=2).values > 0
    largest = distances.max(dim=2).values
    match &= (largest > low[:, None]) & (largest < high[:, None])
    if radius > 0:
        offset = (centers[:, None, :] - gt_boxes.get_centers()[None]).abs().max(dim=2).values
        match &= offset < radius * strides[:, None]
    area = gt_boxes.area()[None].expand_as(match)
    area = torch.where(match, area, torch.full_like(area, float("inf")))
    smallest, index = area.min(dim=1)
    return torch.where(torch.isfinite(smallest), index, torch.full_like(index, BACKGROUND))


def centerness_targets(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of points (R, 2) inside their boxes (R, 4): sqrt(lr ratio * tb ratio)."""
    left_right = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], 1)
    top_bottom = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], 1)
    ratio = (left_right.min(1).values / left_right.max(1).values) * (
        top_bottom.min(1).values / top_bottom.max(1).values
    )
    return ratio.clamp(min=0).sqrt()


def sample_anchors(assigned: torch.Tensor, num: int) -> torch.Tensor:
    """Indices of ``num`` anchors: random positives (up to ``num``), then random background."""
    positive = torch.nonzero(assigned >= 0).flatten()
    background = torch.nonzero(assigned == BACKGROUND).flatten()
    positive = positive[torch.randperm(len(positive), device=positive.device)[:num]]
    background = background[
        torch.randperm(len(background), device=background.device)[: num - len(positive)]
    ]
    return torch.cat([positive, background])


def iou_loss(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """-log IoU of paired XYXY boxes (N,)."""
    lt = torch.max(predicted[:, :2], target[:, :2])
    rb = torch.min(predicted[:, 2:], target[:, 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=1)

    def area(b):
        return (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)

    union = area(predicted) + area(target) - overlap
    return -torch.log((overlap / union.clamp(min=eps)).clamp(min=eps))


def _embedding_head(channels: int, anchors: int, embed_dim: int, kernel: int) -> nn.Sequential:
    head = nn.Sequential(
        nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, anchors * embed_dim, 1),
    )
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)
    return head


class DenseBoxDomainMixin(EMATargetMixin):
    """Box-domain training of a dense detector; subclasses assign, sample and regress."""

    # Kernel of the embedding head's first layer (the public code: RetinaNet 1, FCOS 3).
    embedding_kernel = 1

    def init_box_domain(
        self,
        *,
        embed_dim: int,
        temperature: float,
        contrast_weight: float,
        reg_weight: float,
        num_samples: int,
    ) -> None:
        cls_score = self.head.cls_score
        anchors = cls_score.out_channels // self.num_classes
        self.head.cls_score = _embedding_head(
            cls_score.in_channels, anchors, embed_dim, self.embedding_kernel
        )
        self.embed_dim = embed_dim
        self.temperature = temperature
        self.contrast_weight = contrast_weight
        self.reg_weight = reg_weight
        self.num_samples = num_samples
        self.init_target({"backbone": self.backbone, "head": self.head})

    def _online_module(self, name: str) -> nn.Module:
        return getattr(self, name)

    def _run(self, backbone, head, images):
        features = backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        predictions = head(features)
        dims = [self.embed_dim, 4] + [1] * (len(predictions) - 2)
        return self.anchor_generator(features), transpose_dense(predictions, dims)

    def assign(self, anchors: list[Boxes], gt_instances) -> torch.Tensor:
        """(N, R): per image and anchor, a pseudo-box index, BACKGROUND or IGNORED."""
        raise NotImplementedError

    def sample(self, assigned: torch.Tensor) -> torch.Tensor:
        """Flat indices (into N * R) of the sampled anchors."""
        raise NotImplementedError

    def box_losses(self, anchors, predictions, assigned, chosen, gt_instances) -> dict:
        raise NotImplementedError

    def _view(self, backbone, head, images, gt_instances):
        anchors, predictions = self._run(backbone, head, images)
        assigned = self.assign(anchors, gt_instances)
        chosen = self.sample(assigned)
        offsets = torch.cumsum(torch.tensor([0] + [len(g) for g in gt_instances]), 0)
        ids = assigned + offsets[:-1, None].to(assigned.device)  # instance ids of the batch
        ids = torch.where(assigned >= 0, ids, torch.full_like(ids, BACKGROUND)).flatten()
        return anchors, predictions, assigned, chosen, ids[chosen]

    def forward(self, batched_inputs: list[dict]):
        self._require_training()
        views = [[x[v] for x in batched_inputs] for v in ("view1", "view2")]
        images1, images2 = (self.preprocess_image(v) for v in views)
        gt1, gt2 = ([x["instances"].to(self.device) for x in v] for v in views)

        anchors, predictions, assigned, chosen, ids1 = self._view(
            self.backbone, self.head, images1, gt1
        )
        with torch.no_grad():
            _, predictions2, _, chosen2, ids2 = self._view(
                self.target["backbone"], self.target["head"], images2, gt2
            )
        loss_contrast = box_contrastive_loss(
            predictions[0].flatten(0, 1)[chosen],
            ids1,
            predictions2[0].flatten(0, 1)[chosen2],
            ids2,
            self.temperature,
        )
        get_event_storage().put_scalar("contrast_chance", chance_contrastive_loss(ids1, ids2))
        losses = {"loss_contrast": self.contrast_weight * loss_contrast}
        box = self.box_losses(anchors, predictions, assigned, chosen, gt1)
        losses.update({k: self.reg_weight * v for k, v in box.items()})
        return losses

    def _sampled_positives(self, anchors, assigned, chosen, gt_instances):
        """Flat indices of the sampled positives, their anchors (K, 4) and pseudo-boxes."""
        flat = assigned.flatten()
        positive = chosen[flat[chosen] >= 0]
        num_anchors = assigned.shape[1]
        image, anchor = positive // num_anchors, positive % num_anchors
        boxes = cat([g.gt_boxes.tensor for g in gt_instances])
        offsets = torch.cumsum(torch.tensor([0] + [len(g) for g in gt_instances]), 0)
        matched = boxes[flat[positive] + offsets[:-1].to(boxes.device)[image]]
        return positive, Boxes.cat(anchors).tensor[anchor], matched


@META_ARCH_REGISTRY.register()
class AlignDetRetinaNet(DenseBoxDomainMixin, RetinaNet):
    """RetinaNet with the box-domain embedding head and an EMA target (training only)."""

    @configurable
    def __init__(self, *, box_domain: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.init_box_domain(**box_domain)

    @classmethod
    def from_config(cls, cfg):
        return {
            **super().from_config(cfg),
            "box_domain": {
                **box_domain_args(cfg),
                "num_samples": cfg.ALIGNDET.RETINANET_SAMPLES_PER_IMAGE,
            },
        }

    def assign(self, anchors, gt_instances):
        anchors = Boxes.cat(anchors)
        assigned = []
        for gt in gt_instances:
            if len(gt) == 0:
                assigned.append(torch.full((len(anchors),), BACKGROUND, device=anchors.device))
                continue
            idx, labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            idx = torch.where(labels == 0, torch.full_like(idx, BACKGROUND), idx)
            assigned.append(torch.where(labels < 0, torch.full_like(idx, IGNORED), idx))
        return torch.stack(assigned).long()

    def sample(self, assigned):
        per_image = assigned.shape[1]
        return cat(
            [sample_anchors(a, self.num_samples) + i * per_image for i, a in enumerate(assigned)]
        )

    def box_losses(self, anchors, predictions, assigned, chosen, gt_instances):
        positive, anchor_boxes, boxes = self._sampled_positives(
            anchors, assigned, chosen, gt_instances
        )
        deltas = predictions[1].flatten(0, 1)[positive].float()
        targets = self.box2box_transform.get_deltas(anchor_boxes, boxes)
        return {"loss_box_reg": F.l1_loss(deltas, targets, reduction="sum") / max(len(positive), 1)}


@META_ARCH_REGISTRY.register()
class AlignDetFCOS(DenseBoxDomainMixin, FCOSDetector):
    """FCOS with the box-domain embedding head and an EMA target (training only)."""

    embedding_kernel = 3

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.box_domain_radius = cfg.ALIGNDET.FCOS_CENTER_SAMPLING_RADIUS
        self.init_box_domain(
            **box_domain_args(cfg), num_samples=cfg.ALIGNDET.FCOS_SAMPLES_PER_BATCH
        )

    def assign(self, anchors, gt_instances):
        return torch.stack(
            [fcos_assign(anchors, g.gt_boxes, self.box_domain_radius) for g in gt_instances]
        )

    def sample(self, assigned):
        return sample_anchors(assigned.flatten(), self.num_samples)

    def box_losses(self, anchors, predictions, assigned, chosen, gt_instances):
        positive, anchor_boxes, boxes = self._sampled_positives(
            anchors, assigned, chosen, gt_instances
        )
        deltas = predictions[1].flatten(0, 1)[positive].float()
        ctrness = predictions[2].flatten(0, 1)[positive, 0].float()
        points = (anchor_boxes[:, :2] + anchor_boxes[:, 2:]) / 2
        targets = centerness_targets(points, boxes)
        predicted = self.box2box_transform.apply_deltas(deltas, anchor_boxes)
        loss_iou = (iou_loss(predicted, boxes) * targets).sum() / targets.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctrness, targets, reduction="sum")
        return {"loss_box_reg": loss_iou, "loss_centerness": loss_ctr / max(len(positive), 1)}
