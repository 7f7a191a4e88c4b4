"""Building a detector from a yacs config, and facts about model parameters."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

__all__ = ["NO_DECAY_PARAMS", "build_logged_model"]

logger = logging.getLogger(__name__)

# Parameters (by their name in their module) never decayed by AdamW: position tables.
NO_DECAY_PARAMS = ("absolute_pos_embed", "relative_position_bias_table", "pos_embed", "cls_token")


def build_logged_model(cfg: CfgNode) -> torch.nn.Module:
    """Detectron2's ``build_model``, logging the norm layers the phase's model has."""
    model = build_model(cfg)
    norms = Counter(type(m).__name__ for m in model.modules() if _is_norm(m))
    logger.info("Phase %s: norm layers %s", cfg.DIRECT_PRETRAIN.PHASE, dict(norms))
    return model


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(
        module,
        (
            torch.nn.modules.batchnorm._NormBase,
            torch.nn.GroupNorm,
            torch.nn.LayerNorm,
            FrozenBatchNorm2d,
        ),
    )
