"""Swin Transformer backbone (timm's implementation) for Detectron2, with an FPN on top."""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

__all__ = ["TimmSwin", "add_swin_config", "build_swin_fpn_backbone"]

# Stage outputs are named like ResNet's, so FPN configs written for ResNet apply unchanged.
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def add_swin_config(cfg: CfgNode) -> None:
    """Add ``MODEL.SWIN``."""
    cfg.MODEL.SWIN = CfgNode()
    # timm model name; weights are never downloaded (training from scratch).
    cfg.MODEL.SWIN.NAME = "swin_tiny_patch4_window7_224"
    # Attention window; a change between phases resizes the relative position tables.
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Stochastic depth rate (0.2 in the paper's Swin-T recipe).
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    # Stages returned, named res2..res5 (strides 4..32).
    cfg.MODEL.SWIN.OUT_FEATURES = list(STAGE_NAMES)


class TimmSwin(Backbone):
    """timm Swin Transformer returning NCHW stage features for any input divisible by 32."""

    def __init__(
        self, name: str, window_size: int, drop_path_rate: float, out_features: list[str]
    ) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            strict_img_size=False,
            dynamic_img_size=True,
        )
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES: unknown {sorted(unknown)}; " f"use {list(STAGE_NAMES)}"
            )
        info = self.body.feature_info
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(STAGE_NAMES, info.channels()))
        self._out_feature_strides = dict(zip(STAGE_NAMES, info.reduction()))

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)  # NHWC
        return {
            name: f.permute(0, 3, 1, 2).contiguous()
            for name, f in zip(STAGE_NAMES, features)
            if name in self._out_features
        }

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Swin (``MODEL.SWIN``) + FPN (``MODEL.FPN``), for the R-CNN family."""
    node = cfg.MODEL.SWIN
    return FPN(
        bottom_up=TimmSwin(node.NAME, node.WINDOW_SIZE, node.DROP_PATH_RATE, node.OUT_FEATURES),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
