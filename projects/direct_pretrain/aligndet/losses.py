"""AlignDet's box-level contrastive loss and the EMA schedule of the target detector."""

from __future__ import annotations

import math

import torch
from detectron2.engine import HookBase
from torch.nn import functional as F

__all__ = ["EMAHook", "box_contrastive_loss", "chance_contrastive_loss", "ema_momentum"]


# Replaces masked logits: its exp() is exactly 0 in float32 (no -inf, no NaN gradients).
_MASKED = -1e9


def box_contrastive_loss(
    online: torch.Tensor,
    online_ids: torch.Tensor,
    target: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """AlignDet's box-level contrastive loss, per instance as the public code computes it.

    Every sampled RoI (anchor, point) of view 1 (online detector) and view 2 (target detector)
    belongs to an instance (a pseudo-box id, the same in both views) or to the background
    (id < 0, dense detectors only). For each instance ``c`` with online RoIs (the queries):
    the keys are its target RoIs (its queries themselves if the target has none); the
    negatives are the RoIs of every other instance and of the background in both views, the
    online ones detached. Each (key, query) pair is a cross-entropy over
    ``[q.k, q.n_1, ..., q.n_K] / temperature`` with the key as the answer; the pairs of an
    instance are averaged, then the instances. Computed in float32 (safe under autocast).

    Args:
        online: (N1, D) online embeddings (not normalised) of the sampled RoIs of view 1.
        online_ids: (N1,) instance id of each, < 0 for background.
        target: (N2, D) target embeddings of the sampled RoIs of view 2 (no gradient needed).
        target_ids: (N2,) instance id of each, < 0 for background.
        temperature: the softmax temperature.

    Returns:
        The loss (0, with a graph, when view 1 has no instance RoI).
    """
    with torch.autocast(online.device.type, enabled=False):
        return _box_contrastive_loss(
            online.float(), online_ids, target.float(), target_ids, temperature
        )


def _box_contrastive_loss(online, online_ids, target, target_ids, temperature):
    online = F.normalize(online, dim=1)
    target = F.normalize(target, dim=1)
    is_query = online_ids >= 0
    if not bool(is_query.any()):
        return online.sum() * 0.0
    queries, query_ids = online[is_query], online_ids[is_query]
    # Negatives of a query: every RoI of both views whose instance differs from its own.
    negatives = torch.cat([online.detach(), target])
    negative_ids = torch.cat([online_ids, target_ids])
    negative_logits = (queries @ negatives.T / temperature).masked_fill(
        query_ids[:, None] == negative_ids[None, :], _MASKED
    )
    negative_lse = torch.logsumexp(
        torch.cat([negative_logits, negative_logits.new_full((len(queries), 1), _MASKED)], 1), 1
    )
    # Keys: the target RoIs; an instance the target has none of uses its own queries.
    instances = torch.unique(query_ids)
    without_key = ~torch.isin(instances, target_ids)
    own = torch.isin(query_ids, instances[without_key])
    keys = torch.cat([target, queries[own]])
    key_ids = torch.cat([target_ids, query_ids[own]])
    positive = queries @ keys.T / temperature
    pair = query_ids[:, None] == key_ids[None, :]
    pair_loss = (torch.logaddexp(positive, negative_lse[:, None]) - positive) * pair
    # Mean over the (key, query) pairs of each instance, then over the instances.
    slot = torch.searchsorted(instances, query_ids)
    loss_sum = pair_loss.new_zeros(len(instances)).index_add_(0, slot, pair_loss.sum(1))
    pairs = pair.sum(1).to(loss_sum.dtype)
    pair_count = loss_sum.new_zeros(len(instances)).index_add_(0, slot, pairs)
    return (loss_sum / pair_count).mean()


def chance_contrastive_loss(online_ids: torch.Tensor, target_ids: torch.Tensor) -> float:
    """What :func:`box_contrastive_loss` gives for these RoIs when the embeddings tell nothing
    apart (every similarity equal): the mean over instances of log(1 + the instance's number
    of negatives). It grows with the RoIs sampled; ``loss_contrast`` below it is learning."""
    ids = torch.cat([online_ids, target_ids])
    instances = torch.unique(online_ids[online_ids >= 0])
    if len(instances) == 0:
        return 0.0
    negatives = len(ids) - (ids[None, :] == instances[:, None]).sum(1)
    return float(torch.log1p(negatives.double()).mean())


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
