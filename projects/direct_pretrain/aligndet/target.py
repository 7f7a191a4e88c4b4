"""The EMA target detector shared by AlignDet's box-domain models."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

__all__ = ["EMATargetMixin", "freeze"]


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``module``; return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class EMATargetMixin:
    """A frozen backbone body and a ``target`` copy of the trained modules, kept as their EMA.

    Subclasses call :meth:`init_target` with the online modules the target copies (by name).
    """

    def init_target(self, online: dict[str, nn.Module]) -> None:
        freeze(self.backbone.bottom_up)
        self._online_names = tuple(online)
        self.target = freeze(copy.deepcopy(nn.ModuleDict(online)))

    def _pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        for name in self._online_names:
            yield self._online_module(name), self.target[name]

    def _online_module(self, name: str) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def reset_target(self) -> None:
        """Make the target detector a copy of the online one."""
        for online, target in self._pairs():
            target.load_state_dict(online.state_dict())

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * online (buffers copied)."""
        for online, target in self._pairs():
            for p_t, p_o in zip(target.parameters(), online.parameters()):
                if p_o.requires_grad:
                    p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)
            for b_t, b_o in zip(target.buffers(), online.buffers()):
                b_t.copy_(b_o)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.bottom_up.eval()  # frozen: its norm statistics never change
        self.target.eval()
        return self

    def _require_training(self) -> None:
        if not self.training:
            raise RuntimeError(
                "an AlignDet box-domain model has no classifier; fine-tune it "
                "(the next phase) to detect"
            )
