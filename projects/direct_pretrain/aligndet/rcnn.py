"""Box-domain pre-training of two-stage detectors (Faster/Mask R-CNN): ``AlignDetRCNN``.

The online detector is a GeneralizedRCNN whose ResNet/Swin body is frozen; its FPN, RPN and
RoI box head are trained without labels on two views of each image:

* RPN: objectness and box regression with the pseudo-boxes as ground truth, sampling as many
  positive anchors as possible (``ALIGNDET.RPN_*``: 4096 anchors per image, positive fraction
  1, negatives only fill what positives leave), as the public recipe.
* RoI head: proposals and pseudo-boxes matched to a pseudo-box at IoU >= 0.5 (positives only)
  give a 256-d projection (an fc-ReLU-fc MLP in place of the classifier), trained with
  :func:`info_nce` against the target detector's embedding of the same pseudo-box in view 2,
  and a class-agnostic L1 box regression toward the pseudo-box.

The target detector (FPN, box head and projection) is an EMA of the online one, run on view 2
without gradients; its embedding of each pseudo-box in view 2 is the positive of that instance
(the public code samples target RoIs too; using the pseudo-box itself is our simplification).
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
from torch import nn
from torch.nn import functional as F

from .losses import info_nce
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
        return F.normalize(self.projector(x), dim=1), self.bbox_pred(x)


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
        return self.backbone if name == "backbone" else getattr(self.roi_heads, name)

    # --- training ---------------------------------------------------------------------------
    def _embed(self, features: dict, boxes: list[Boxes], box_head, box_predictor):
        pooled = self.roi_heads.box_pooler(
            [features[f] for f in self.roi_heads.box_in_features], boxes
        )
        return box_predictor(box_head(pooled))

    def _positive_rois(self, proposals, gt_instances):
        """Per image: sampled positive RoIs (IoU >= 0.5 with a pseudo-box) and their matches."""
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

    def forward(self, batched_inputs: list[dict]):
        self._require_training()
        views = [[x[v] for x in batched_inputs] for v in ("view1", "view2")]
        images1, images2 = (self.preprocess_image(v) for v in views)
        gt1, gt2 = ([x["instances"].to(self.device) for x in v] for v in views)
        heads = self.roi_heads

        features1 = self.backbone(images1.tensor)
        proposals, losses = self.proposal_generator(images1, features1, gt1)
        rois, matched = self._positive_rois(proposals, gt1)
        # Pseudo-box j of image i is instance offsets[i] + j of the batch.
        offsets = torch.cumsum(torch.tensor([0] + [len(g) for g in gt1]), 0).tolist()
        instance_ids = cat([m + offsets[i] for i, m in enumerate(matched)])
        queries, deltas = self._embed(features1, rois, heads.box_head, heads.box_predictor)
        matched_boxes = cat([g.gt_boxes.tensor[m] for g, m in zip(gt1, matched)])
        targets = self.box2box_transform.get_deltas(cat([r.tensor for r in rois]), matched_boxes)
        loss_reg = F.l1_loss(deltas, targets, reduction="sum") / max(len(targets), 1)
        with torch.no_grad():
            online_keys = self._embed(
                features1, [g.gt_boxes for g in gt1], heads.box_head, heads.box_predictor
            )[0]
            features2 = self.target["backbone"](images2.tensor)
            target_keys = self._embed(
                features2,
                [g.gt_boxes for g in gt2],
                self.target["box_head"],
                self.target["box_predictor"],
            )[0]
        loss_contrast = info_nce(queries, instance_ids, target_keys, online_keys, self.temperature)
        losses.update(
            loss_contrast=self.contrast_weight * loss_contrast,
            loss_box_reg=self.reg_weight * loss_reg,
        )
        return losses
