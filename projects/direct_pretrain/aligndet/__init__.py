"""AlignDet box-domain pre-training (Li et al., ICCV 2023) as Detectron2 components."""

from detectron2.config import CfgNode

from .config import add_aligndet_config
from .dense import AlignDetFCOS, AlignDetRetinaNet
from .losses import EMAHook, ema_momentum, info_nce
from .proposals import load_proposals
from .rcnn import AlignDetRCNN
from .views import TwoViewMapper

__all__ = [
    "AlignDetFCOS",
    "AlignDetRCNN",
    "AlignDetRetinaNet",
    "EMAHook",
    "TwoViewMapper",
    "add_aligndet_config",
    "ema_momentum",
    "info_nce",
    "load_proposals",
    "transfer_drop",
]


# Per detector: weights box-domain pre-training never trains (the mask head), and its final
# prediction layers, which the fine-tuned model re-initialises unless ALIGNDET.KEEP_PREDICTORS.
NOT_PRETRAINED = {"GeneralizedRCNN": (r"^roi_heads\.mask_head\.",)}
PREDICTORS = {
    "GeneralizedRCNN": (r"^roi_heads\.box_predictor\.",),
    "RetinaNet": (r"^head\.cls_score\.", r"^head\.bbox_pred\."),
    "FCOSDetector": (r"^head\.cls_score\.", r"^head\.bbox_pred\.", r"^head\.ctrness\."),
}


def transfer_drop(cfg: CfgNode) -> tuple[str, ...]:
    """Key patterns the bridge re-initialises when fine-tuning a box-domain checkpoint."""
    arch = cfg.MODEL.META_ARCHITECTURE
    keep = cfg.ALIGNDET.KEEP_PREDICTORS
    return NOT_PRETRAINED.get(arch, ()) + (() if keep else PREDICTORS.get(arch, ()))
