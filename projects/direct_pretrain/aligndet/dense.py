"""Box-domain pre-training of one-stage detectors: ``AlignDetRetinaNet`` and ``AlignDetFCOS``.

The same idea as :mod:`.rcnn`, per anchor (RetinaNet) or point (FCOS): the classifier becomes a
per-anchor fc-ReLU-fc embedding (1x1 convolutions, as the public code). Anchors are assigned to
pseudo-boxes with the detector's own rule (RetinaNet: IoU 0.5/0.4; FCOS: centre sampling and
scale ranges). Up to ``ALIGNDET.DENSE_POSITIVES_PER_IMAGE`` positive anchors of view 1 are the
queries; an instance's key is the mean embedding of its positive anchors, in view 2 from the EMA
target (the positive) and in view 1 from the online detector (negatives only). Instances
without a positive anchor in both views are left out of the contrastive loss (background anchors
are not used as negatives: our simplification). Regression: RetinaNet's own box loss on positive
anchors; FCOS's GIoU loss weighted by the centerness targets, plus centerness BCE.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.structures import Boxes, pairwise_iou
from fvcore.nn import giou_loss
from torch import nn
from torch.nn import functional as F

from ..modeling.fcos import FCOSDetector
from .losses import info_nce
from .rcnn import box_domain_args
from .target import EMATargetMixin

__all__ = ["AlignDetFCOS", "AlignDetRetinaNet"]


def _embedding_head(channels: int, anchors: int, embed_dim: int) -> nn.Sequential:
    head = nn.Sequential(
        nn.Conv2d(channels, channels, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, anchors * embed_dim, 1),
    )
    for layer in (head[0], head[2]):
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)
    return head


def _instance_means(embeddings: torch.Tensor, ids: torch.Tensor, count: int):
    """Mean L2-normalised embedding per instance id (rows of ids < 0 are skipped)."""
    keep = ids >= 0
    sums = embeddings.new_zeros(count, embeddings.shape[1]).index_add_(
        0, ids[keep], F.normalize(embeddings[keep], dim=1)
    )
    hits = torch.bincount(ids[keep], minlength=count)
    return F.normalize(sums, dim=1), hits > 0


class DenseBoxDomainMixin(EMATargetMixin):
    """Box-domain training of a DenseDetector; subclasses define matching and box losses."""

    def init_box_domain(
        self,
        *,
        embed_dim: int,
        temperature: float,
        contrast_weight: float,
        reg_weight: float,
        positives_per_image: int,
    ) -> None:
        cls_score = self.head.cls_score
        anchors = cls_score.out_channels // self.num_classes
        self.head.cls_score = _embedding_head(cls_score.in_channels, anchors, embed_dim)
        self.embed_dim = embed_dim
        self.temperature = temperature
        self.contrast_weight = contrast_weight
        self.reg_weight = reg_weight
        self.positives_per_image = positives_per_image
        self.init_target({"backbone": self.backbone, "head": self.head})

    def _online_module(self, name: str) -> nn.Module:
        return getattr(self, name)

    def _run(self, backbone, head, images):
        features = backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        predictions = head(features)
        dims = [self.embed_dim, 4] + [1] * (len(predictions) - 2)
        return features, self._transpose_dense_predictions(predictions, dims)

    def match(self, anchors: list[Boxes], gt_instances) -> list[torch.Tensor]:
        """Per image: the pseudo-box index of every anchor, -1 for background/ignored."""
        raise NotImplementedError

    def box_losses(self, anchors, predictions, matched, gt_instances) -> dict:
        raise NotImplementedError

    def forward(self, batched_inputs: list[dict]):
        self._require_training()
        views = [[x[v] for x in batched_inputs] for v in ("view1", "view2")]
        images1, images2 = (self.preprocess_image(v) for v in views)
        gt1, gt2 = ([x["instances"].to(self.device) for x in v] for v in views)

        features1, predictions1 = self._run(self.backbone, self.head, images1)
        anchors1 = self.anchor_generator(features1)
        matched1 = self.match(anchors1, gt1)
        with torch.no_grad():
            features2, predictions2 = self._run(
                self.target["backbone"], self.target["head"], images2
            )
            matched2 = self.match(self.anchor_generator(features2), gt2)

        # Instance j of image i is id offsets[i] + j in both views.
        offsets = torch.cumsum(torch.tensor([0] + [len(g) for g in gt1]), 0).tolist()
        count = offsets[-1]

        def global_ids(matched):
            return cat([torch.where(m >= 0, m + offsets[i], m) for i, m in enumerate(matched)])

        embed1 = cat(list(predictions1[0]), dim=1).flatten(0, 1)
        embed2 = cat(list(predictions2[0]), dim=1).flatten(0, 1)
        ids1, ids2 = global_ids(matched1), global_ids(matched2)
        target_keys, in_view2 = _instance_means(embed2, ids2, count)
        online_keys, in_view1 = _instance_means(embed1.detach(), ids1, count)
        both = in_view1 & in_view2
        compact = torch.cumsum(both.long(), 0) - 1  # ids of instances present in both views
        queries = self._sample_queries(ids1, both, len(gt1))
        loss_contrast = info_nce(
            F.normalize(embed1[queries], dim=1),
            compact[ids1[queries]],
            target_keys[both],
            online_keys[both],
            self.temperature,
        )
        losses = {"loss_contrast": self.contrast_weight * loss_contrast}
        box = self.box_losses(anchors1, predictions1, matched1, gt1)
        losses.update({k: self.reg_weight * v for k, v in box.items()})
        return losses

    def _sample_queries(self, ids: torch.Tensor, usable: torch.Tensor, num_images: int):
        """Indices of sampled positive anchors (of instances usable in the loss), per image."""
        per_image = len(ids) // num_images
        chosen = []
        for i in range(num_images):
            part = ids[i * per_image : (i + 1) * per_image]
            idx = torch.nonzero((part >= 0) & usable[part.clamp(min=0)]).flatten()
            idx = idx[torch.randperm(len(idx), device=idx.device)[: self.positives_per_image]]
            chosen.append(idx + i * per_image)
        return cat(chosen)

    def _positives(self, anchors, matched, gt_instances):
        """Foreground mask (N, R) and matched boxes per image (R, 4) for the box losses."""
        fg = torch.stack([m >= 0 for m in matched])
        boxes = [
            g.gt_boxes.tensor[m.clamp(min=0)] if len(g) else torch.zeros(len(m), 4, device=m.device)
            for g, m in zip(gt_instances, matched)
        ]
        return fg, boxes


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
                "positives_per_image": cfg.ALIGNDET.DENSE_POSITIVES_PER_IMAGE,
            },
        }

    def match(self, anchors, gt_instances):
        anchors = Boxes.cat(anchors)
        matched = []
        for gt in gt_instances:
            idx, labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            matched.append(torch.where(labels == 1, idx, torch.full_like(idx, -1)))
        return matched

    def box_losses(self, anchors, predictions, matched, gt_instances):
        fg, boxes = self._positives(anchors, matched, gt_instances)
        loss = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            predictions[1],
            boxes,
            fg,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_box_reg": loss / max(int(fg.sum()), 1)}


@META_ARCH_REGISTRY.register()
class AlignDetFCOS(DenseBoxDomainMixin, FCOSDetector):
    """FCOS with the box-domain embedding head and an EMA target (training only)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.init_box_domain(
            **box_domain_args(cfg), positives_per_image=cfg.ALIGNDET.DENSE_POSITIVES_PER_IMAGE
        )

    def match(self, anchors, gt_instances):
        return self.match_anchors(anchors, gt_instances)

    def box_losses(self, anchors, predictions, matched, gt_instances):
        fg, boxes = self._positives(anchors, matched, gt_instances)
        flat_anchors = Boxes.cat(anchors).tensor
        deltas = cat(list(predictions[1]), dim=1)[fg]
        ctrness = cat(list(predictions[2]), dim=1).squeeze(2)[fg]
        gt_boxes = torch.stack(boxes)[fg]
        anchor_boxes = flat_anchors.expand(len(boxes), -1, -1)[fg]
        ctrness_targets = self.compute_ctrness_targets(anchors, [Boxes(b) for b in boxes])[fg]
        predicted = self.box2box_transform.apply_deltas(deltas, anchor_boxes)
        iou = giou_loss(predicted, gt_boxes, reduction="none")
        weight = ctrness_targets.sum().clamp(min=1e-6)
        return {
            "loss_box_reg": (iou * ctrness_targets).sum() / weight,
            "loss_centerness": F.binary_cross_entropy_with_logits(
                ctrness, ctrness_targets, reduction="sum"
            )
            / max(int(fg.sum()), 1),
        }
