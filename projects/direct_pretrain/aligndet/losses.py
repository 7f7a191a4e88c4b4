"""AlignDet's box-level contrastive loss and the EMA schedule of the target detector."""

from __future__ import annotations

import math

import torch
from detectron2.engine import HookBase
from torch.nn import functional as F

__all__ = ["EMAHook", "ema_momentum", "info_nce"]


def info_nce(
    queries: torch.Tensor,
    instance_ids: torch.Tensor,
    target_keys: torch.Tensor,
    online_keys: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Box-level InfoNCE of AlignDet.

    Args:
        queries: (Q, D) L2-normalised online embeddings of positive RoIs of view 1.
        instance_ids: (Q,) index of each query's pseudo-box (instance) among the M instances.
        target_keys: (M, D) L2-normalised target-detector embeddings of the instances in view 2;
            the query's own instance is its positive, the others are negatives.
        online_keys: (M, D) L2-normalised online embeddings of the instances in view 1; every
            instance but the query's own is a negative.
        temperature: the softmax temperature.

    Returns:
        Cross-entropy at the positive, averaged over the queries (0 without queries). The keys
        are used as given: pass them detached.
    """
    if len(queries) == 0:
        return queries.sum() * 0.0
    rows = torch.arange(len(queries), device=queries.device)
    target_logits = queries @ target_keys.T / temperature
    online_logits = (queries @ online_keys.T / temperature).index_put(
        (rows, instance_ids), torch.tensor(float("-inf"), device=queries.device)
    )
    return F.cross_entropy(torch.cat([target_logits, online_logits], dim=1), instance_ids)


def ema_momentum(base: float, iteration: int, max_iter: int) -> float:
    """EMA momentum rising from ``base`` at iteration 0 to 1 at ``max_iter`` (cosine)."""
    progress = min(max(iteration / max(max_iter, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMAHook(HookBase):
    """Keeps the target detector an EMA of the online one (``model.update_target``).

    At the start of a fresh phase the target is set to a copy of the online detector; on resume
    the checkpointed target is kept.
    """

    def __init__(self, base_momentum: float) -> None:
        self.base_momentum = base_momentum

    def _model(self):
        model = self.trainer.model
        return getattr(model, "module", model)  # DistributedDataParallel

    def before_train(self) -> None:
        if self.trainer.start_iter == 0:
            self._model().reset_target()

    def after_step(self) -> None:
        momentum = ema_momentum(self.base_momentum, self.trainer.iter + 1, self.trainer.max_iter)
        self._model().update_target(momentum)
        self.trainer.storage.put_scalar("ema_momentum", momentum, smoothing_hint=False)
