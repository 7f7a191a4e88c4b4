"""Backbone BatchNorm with fixed statistics and trainable affine parameters ("norm_eval").

MMDetection's ResNet ``norm_eval=True``, which the public AlignDet fine-tuning configs use with
SyncBN: the norm layers of the backbone body stay in eval mode (their running statistics are
used and never updated) while their weight and bias train. Detectron2 has no such norm, so a
hook puts them back in eval mode before every step (evaluation switches the model to train
mode when it ends).
"""

from __future__ import annotations

from detectron2.engine import HookBase
from torch import nn

__all__ = ["BackboneNormEval", "backbone_norms_eval"]


def backbone_norms_eval(model: nn.Module) -> int:
    """Put the BatchNorm layers of ``model.backbone.bottom_up`` in eval mode; return how many."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    body = getattr(model.backbone, "bottom_up", model.backbone)
    norms = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return len(norms)


class BackboneNormEval(HookBase):
    """Keeps the backbone body's BatchNorm statistics fixed during training."""

    def before_step(self) -> None:
        backbone_norms_eval(self.trainer.model)
