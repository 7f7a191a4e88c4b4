"""Box-domain pre-training of two-stage detectors (Faster/Mask R-CNN): ``AlignDetRCNN``.

As the public code (liming-ai/AlignDet: ``SelfSupDetector``, ``SelfSupMaskRCNN``,
``SelfSupConvFCBBoxHead.loss``, ``configs/_base_/models/selfsup_mask_rcnn_r50_fpn.py``):

* the online detector (FPN, RPN, box head; ResNet/Swin body frozen) runs on view 1, the
  target detector (an EMA copy of all of it) on view 2, each with its own RPN proposals;
* RPN: objectness and box regression with the pseudo-boxes as ground truth, 4096 anchors per
  image with positive fraction 1 (negatives only fill what positives leave);
* RoIs: in each view, proposals plus the pseudo-boxes, matched to a pseudo-box at IoU >= 0.5;
  up to ``ALIGNDET.POSITIVES_PER_IMAGE`` positives sampled, no negatives;
* the classifier becomes a 256-d fc-ReLU-fc projection trained with
  :func:`box_contrastive_loss` (every online RoI of an instance against every target RoI of
  it; negatives the other instances' RoIs of both views); L1 regression of the online RoIs
  toward their pseudo-box (class-agnostic here; the public head indexes its class-specific
  outputs by instance id).

The mask head is not pre-trained.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from .losses import box_contrastive_loss, chance_contrastive_loss
from .target import EMATargetMixin

__all__ = ["AlignDetRCNN", "BoxDomainPredictor"]


def box_domain_args(cfg) -> dict:
    """The ``ALIGNDET`` settings every box-domain model takes."""
    node = cfg.ALIGNDET
    return {
        "embed_dim": node.EMBED_DIM,
        "temperature": node.TEMPERATURE,
        "contrast_weight": node.CONTRAST_WEIGHT,
        "reg_weight": node.REG_WEIGHT,
    }


class BoxDomainPredictor(nn.Module):
    """Replaces the box predictor: a projection MLP and a class-agnostic box regressor."""

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_features, in_features),
            nn.ReLU(inplace=True),
            nn.Linear(in_features, embed_dim),
        )
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.projector(x), self.bbox_pred(x)


@META_ARCH_REGISTRY.register()
class AlignDetRCNN(EMATargetMixin, GeneralizedRCNN):
    """Online GeneralizedRCNN + EMA target for box-domain pre-training (training only)."""

    @configurable
    def __init__(
        self,
        *,
        embed_dim: int,
        temperature: float,
        positives_per_image: int,
        contrast_weight: float,
        reg_weight: float,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        heads = self.roi_heads
        self.box2box_transform = heads.box_predictor.box2box_transform
        heads.box_predictor = BoxDomainPredictor(heads.box_head.output_shape.channels, embed_dim)
        self.temperature = temperature
        self.positives_per_image = positives_per_image
        self.contrast_weight = contrast_weight
        self.reg_weight = reg_weight
        self.matcher = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
        self.init_target(
            {
                "backbone": self.backbone,
                "proposal_generator": self.proposal_generator,
                "box_head": heads.box_head,
                "box_predictor": heads.box_predictor,
            }
        )

    @classmethod
    def from_config(cls, cfg):
        return {
            **super().from_config(cfg),
            **box_domain_args(cfg),
            "positives_per_image": cfg.ALIGNDET.POSITIVES_PER_IMAGE,
        }

    def _online_module(self, name: str) -> nn.Module:
        if name in ("backbone", "proposal_generator"):
            return getattr(self, name)
        return getattr(self.roi_heads, name)

    def train(self, mode: bool = True):
        super().train(mode)
        # The target's RPN proposes as in training (train top-k), as the public code's does.
        self.target["proposal_generator"].train(mode)
        return self

    # --- training ---------------------------------------------------------------------------
    def _embed(self, features: dict, boxes: list[Boxes], box_head, box_predictor):
        pooled = self.roi_heads.box_pooler(
            [features[f] for f in self.roi_heads.box_in_features], boxes
        )
        return box_predictor(box_head(pooled))

    def _positive_rois(self, proposals, gt_instances):
        """Per image: sampled positive RoIs (IoU >= 0.5 with a pseudo-box, pseudo-boxes
        included) and the index of their pseudo-box."""
        rois, matched = [], []
        for props, gt in zip(proposals, gt_instances):
            props = add_ground_truth_to_proposals([gt], [props])[0]
            idx, labels = self.matcher(pairwise_iou(gt.gt_boxes, props.proposal_boxes))
            positive = torch.nonzero(labels == 1).flatten()
            positive = positive[
                torch.randperm(len(positive), device=positive.device)[: self.positives_per_image]
            ]
            rois.append(props.proposal_boxes[positive])
            matched.append(idx[positive])
        return rois, matched

    def _instance_ids(self, matched: list[torch.Tensor], gt_instances) -> torch.Tensor:
        """Pseudo-box j of image i is instance offsets[i] + j of the batch (both views)."""
        offsets = torch.cumsum(torch.tensor([0] + [len(g) for g in gt_instances]), 0).tolist()
        return cat([m + offsets[i] for i, m in enumerate(matched)])

    def forward(self, batched_inputs: list[dict]):
        self._require_training()
        views = [[x[v] for x in batched_inputs] for v in ("view1", "view2")]
        images1, images2 = (self.preprocess_image(v) for v in views)
        gt1, gt2 = ([x["instances"].to(self.device) for x in v] for v in views)
        heads = self.roi_heads

        features1 = self.backbone(images1.tensor)
        proposals1, losses = self.proposal_generator(images1, features1, gt1)
        rois1, matched1 = self._positive_rois(proposals1, gt1)
        embed1, deltas = self._embed(features1, rois1, heads.box_head, heads.box_predictor)
        with torch.no_grad():
            features2 = self.target["backbone"](images2.tensor)
            proposals2, _ = self.target["proposal_generator"](images2, features2, gt2)
            rois2, matched2 = self._positive_rois(proposals2, gt2)
            embed2, _ = self._embed(
                features2, rois2, self.target["box_head"], self.target["box_predictor"]
            )
        ids1, ids2 = self._instance_ids(matched1, gt1), self._instance_ids(matched2, gt2)
        loss_contrast = box_contrastive_loss(embed1, ids1, embed2, ids2, self.temperature)
        get_event_storage().put_scalar("contrast_chance", chance_contrastive_loss(ids1, ids2))
        matched_boxes = cat([g.gt_boxes.tensor[m] for g, m in zip(gt1, matched1)])
        targets = self.box2box_transform.get_deltas(cat([r.tensor for r in rois1]), matched_boxes)
        loss_reg = F.l1_loss(deltas.float(), targets, reduction="sum") / max(len(targets), 1)
        losses.update(
            loss_contrast=self.contrast_weight * loss_contrast,
            loss_box_reg=self.reg_weight * loss_reg,
        )
        return losses
