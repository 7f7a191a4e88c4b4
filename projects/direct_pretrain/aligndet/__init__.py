"""AlignDet box-domain pre-training (Li et al., ICCV 2023) as Detectron2 components."""

from .config import add_aligndet_config
from .dense import AlignDetFCOS, AlignDetRetinaNet
from .losses import EMAHook, box_contrastive_loss, chance_contrastive_loss, ema_momentum
from .phase import BoxDomainPhase, transfer_drop
from .proposals import load_proposals
from .rcnn import AlignDetRCNN
from .views import TwoViewMapper

__all__ = [
    "AlignDetFCOS",
    "AlignDetRCNN",
    "AlignDetRetinaNet",
    "BoxDomainPhase",
    "EMAHook",
    "TwoViewMapper",
    "add_aligndet_config",
    "box_contrastive_loss",
    "chance_contrastive_loss",
    "ema_momentum",
    "load_proposals",
    "transfer_drop",
]
