"""FCOS buildable from a yacs config (Detectron2 ships it for LazyConfig only)."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

__all__ = ["FCOSDetector", "add_fcos_config", "build_fcos_resnet_fpn_backbone"]


def add_fcos_config(cfg: CfgNode) -> None:
    """Add ``MODEL.FCOS`` (defaults of Detectron2's LazyConfig FCOS)."""
    cfg.MODEL.FCOS = CfgNode()
    node = cfg.MODEL.FCOS
    node.NUM_CLASSES = 80
    # FPN levels the head runs on.
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convolutions in each of the classification and regression towers.
    node.NUM_CONVS = 4
    # Norm of the head towers ("GN" in FCOS; the phases' HEAD_NORM sets it).
    node.NORM = "GN"
    # Initial foreground probability of the classifier.
    node.PRIOR_PROB = 0.01
    node.FOCAL_LOSS_ALPHA = 0.25
    node.FOCAL_LOSS_GAMMA = 2.0
    # Points within this many strides of a box centre are positives.
    node.CENTER_SAMPLING_RADIUS = 1.5
    node.SCORE_THRESH_TEST = 0.2
    node.TOPK_CANDIDATES_TEST = 1000
    node.NMS_THRESH_TEST = 0.6


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode, input_shape) -> FPN:
    """ResNet-FPN whose P6/P7 are computed from P5, as FCOS does."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@META_ARCH_REGISTRY.register()
class FCOSDetector(FCOS):
    """Detectron2's :class:`FCOS`, built from ``MODEL.FCOS`` and the usual backbone keys."""

    def __init__(self, cfg: CfgNode) -> None:
        node = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        head = FCOSHead(
            input_shape=[shapes[f] for f in node.IN_FEATURES],
            conv_dims=[shapes[node.IN_FEATURES[0]].channels] * node.NUM_CONVS,
            num_classes=node.NUM_CLASSES,
            prior_prob=node.PRIOR_PROB,
            norm=node.NORM,
        )
        super().__init__(
            backbone=backbone,
            head=head,
            head_in_features=node.IN_FEATURES,
            num_classes=node.NUM_CLASSES,
            center_sampling_radius=node.CENTER_SAMPLING_RADIUS,
            focal_loss_alpha=node.FOCAL_LOSS_ALPHA,
            focal_loss_gamma=node.FOCAL_LOSS_GAMMA,
            test_score_thresh=node.SCORE_THRESH_TEST,
            test_topk_candidates=node.TOPK_CANDIDATES_TEST,
            test_nms_thresh=node.NMS_THRESH_TEST,
            max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )
