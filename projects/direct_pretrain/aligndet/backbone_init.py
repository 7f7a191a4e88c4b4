"""Start box-domain pre-training from a backbone checkpoint the user brings (no download).

The public AlignDet code starts its box-domain stage from an ImageNet (torchvision) or
self-supervised (MoCo, PixPro, SwAV) ResNet. :func:`convert_resnet_state` turns such a state
dict into Detectron2's ``backbone.bottom_up.*`` names and says what it did with every key.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["ConversionReport", "convert_resnet_state", "is_torchvision_resnet"]

# Wrappers around the ResNet in self-supervised checkpoints: DataParallel, MoCo v1/v2
# (encoder_q), MoCo v3 (base_encoder), MMSelfSup/PixPro-style (backbone, encoder).
_WRAPPERS = ("module.", "encoder_q.", "base_encoder.", "backbone.", "encoder.")
# Parts of such checkpoints that are not the query ResNet body.
_NOT_BODY = re.compile(
    r"^(fc\.|head\.|encoder_k\.|momentum_encoder\.|predictor\.|projector\.|queue)"
)
_KEY_ENCODER = re.compile(r"^(module\.)?(encoder_k|momentum_encoder)\.")
_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$")
_SHORTCUT = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


@dataclass
class ConversionReport:
    """Source key -> Detectron2 key, and source keys left out (with why)."""

    renamed: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _unwrap(state: dict) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def is_torchvision_resnet(state: dict) -> bool:
    """Whether ``state`` (possibly wrapped) holds torchvision-named ResNet weights."""
    keys = {_strip(k) for k in _unwrap(state)}
    return "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys)


def _d2_name(key: str) -> str | None:
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[4:]
    m = _BLOCK.match(key)
    if m:
        stage, block, kind, index, rest = m.groups()
        norm = "norm." if kind == "bn" else ""
        return f"res{int(stage) + 1}.{block}.conv{index}.{norm}{rest}"
    m = _SHORTCUT.match(key)
    if m:
        stage, block, part, rest = m.groups()
        return f"res{int(stage) + 1}.{block}.shortcut.{'norm.' if part == '1' else ''}{rest}"
    return None


def convert_resnet_state(
    state: dict, input_format: str = "BGR"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """torchvision/MoCo-style ResNet weights -> ``backbone.bottom_up.*`` Detectron2 weights.

    Args:
        state: the loaded checkpoint (a state dict, or one under "state_dict"/"model"; keys may
            carry ``module.``, ``encoder_q.``, ``base_encoder.``, ``backbone.`` prefixes).
        input_format: the config's INPUT.FORMAT; torchvision ResNets read RGB, so for "BGR"
            the first convolution's input channels are reversed (an exact conversion).

    Returns:
        The converted weights and the report of every source key.
    """
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in _unwrap(state).items():
        if not isinstance(value, torch.Tensor):
            report.ignored[key] = "not a tensor"
            continue
        if _KEY_ENCODER.match(key):
            report.ignored[key] = "not the ResNet body (MoCo key encoder)"
            continue
        bare = _strip(key)
        if _NOT_BODY.match(bare):
            report.ignored[key] = "not the ResNet body"
            continue
        if bare.endswith("num_batches_tracked"):
            report.ignored[key] = "BatchNorm step counter"
            continue
        name = _d2_name(bare)
        if name is None:
            report.ignored[key] = "not a torchvision ResNet key"
            continue
        if name == "stem.conv1.weight" and input_format == "BGR":
            value = value.flip(1)
            report.notes.append("stem.conv1.weight: input channels reversed (RGB -> BGR)")
        out[f"backbone.bottom_up.{name}"] = value
        report.renamed[key] = f"backbone.bottom_up.{name}"
    return out, report
