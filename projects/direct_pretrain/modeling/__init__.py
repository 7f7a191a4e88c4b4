"""Models the project adds to Detectron2's registries (imported for registration)."""

from .build import NO_DECAY_PARAMS, build_logged_model
from .fcos import FCOSDetector, add_fcos_config, build_fcos_resnet_fpn_backbone
from .swin import TimmSwin, add_swin_config, build_swin_fpn_backbone

__all__ = [
    "NO_DECAY_PARAMS",
    "build_logged_model",
    "FCOSDetector",
    "TimmSwin",
    "add_fcos_config",
    "add_swin_config",
    "build_fcos_resnet_fpn_backbone",
    "build_swin_fpn_backbone",
]
