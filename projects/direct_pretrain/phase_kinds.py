"""Phase kinds: the one extension point for a phase that is not plain detector training.

A phase is a detector trained on labelled boxes unless a :class:`PhaseKind` is registered
under its name. The kind decides what changes for that phase: its model (``adapt_config``),
its training data (``build_train_loader``), extra hooks, whether it is evaluated, how its
initial weights are prepared, and what the next phase must not take from it
(``transfer_drop``), and the config keys it adds (``add_config``). AlignDet registers
``BOX_DOMAIN`` (:mod:`.aligndet.phase`). This module sits at the bottom of the package: a kind
sees configs and resolved phase configs, never the modules that resolve or train them.
"""

from __future__ import annotations

from collections.abc import Callable

from detectron2.config import CfgNode

from .utils.errors import UserError

__all__ = [
    "PhaseConfigError",
    "PhaseKind",
    "config_key_applies",
    "phase_kind",
    "register_phase_kind",
    "registered_phase_kinds",
]


class PhaseConfigError(UserError, ValueError):
    """A phase setting is invalid or unsafe; the message names the key."""


class PhaseKind:
    """Plain detector training; subclasses override what their phase changes."""

    # Whether the phase's model is a detector that the phase evaluates.
    evaluates: bool = True
    # Whether LazyConfig pipelines can run the phase.
    supports_lazy: bool = True
    # Config keys (prefixes) that only this kind reads; other phases ignore them.
    config_prefixes: tuple[str, ...] = ()

    def add_config(self, cfg: CfgNode, new_phase_node: Callable[..., CfgNode]) -> None:
        """Add the kind's config keys and its phase node (``new_phase_node(**defaults)``)."""

    def adapt_config(self, cfg: CfgNode) -> None:
        """Change the phase's (unfrozen) Detectron2 config, e.g. its meta-architecture."""

    def build_train_loader(self, cfg: CfgNode):
        """The phase's training loader, or None for the detector's default loader."""
        return None

    def hooks(self, cfg: CfgNode) -> list:
        """Extra training hooks of the phase."""
        return []

    def prepare_weights(self, cfg: CfgNode) -> CfgNode:
        """The phase config with its MODEL.WEIGHTS made loadable (called on every process of a
        phase whose INIT is "weights")."""
        return cfg

    def transfer_drop(self, own_cfg: CfgNode, next_cfg: CfgNode) -> tuple[str, ...]:
        """Key patterns of the next phase's model to re-initialise when it starts from this
        phase's final model (``own_cfg``, ``next_cfg``: both phases' resolved configs)."""
        return ()


_DEFAULT = PhaseKind()
_KINDS: dict[str, PhaseKind] = {}


def register_phase_kind(name: str, kind: PhaseKind) -> None:
    """Make ``kind`` decide how the phase ``name`` (a DIRECT_PRETRAIN node) trains."""
    _KINDS[name] = kind


def registered_phase_kinds() -> dict[str, PhaseKind]:
    """``{phase name: kind}`` of every registered kind."""
    return dict(_KINDS)


def phase_kind(name: str) -> PhaseKind:
    """The kind of the phase ``name`` (plain detector training if none is registered)."""
    return _KINDS.get(name, _DEFAULT)


def config_key_applies(key: str, phase: str) -> bool:
    """False for a key that only another phase kind reads (e.g. ``ALIGNDET.*`` outside
    BOX_DOMAIN)."""
    own = phase_kind(phase)
    return not any(
        kind is not own and key.startswith(kind.config_prefixes)
        for kind in _KINDS.values()
        if kind.config_prefixes
    )
