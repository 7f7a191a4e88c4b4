"""Checkpoint bridge: load a pre-trained detector into the model of the next phase.

The next phase's model may differ from the one that was trained: other norm layers
(trainable BN -> FrozenBN/SyncBN), another class count, another input resolution. The bridge
copies every weight the target model needs, converts norm layers whose statistics carry over,
resizes Swin relative position tables when the attention window changes (the only learned
resolution-dependent weights of the supported backbones: ResNet has none, and Swin's
position indices and attention masks are buffers rebuilt for each input size), re-initialises
class-specific predictor layers when (and only when) the class count changed, and reports every
key: loaded, converted, re-initialised or ignored. A backbone, FPN or head
weight that is missing or has another shape is an error naming the key, never a skip.

The result is a plain Detectron2 checkpoint (``{"model": state_dict}``) that starts the next
phase with a fresh optimizer, scheduler and iteration counter.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn import functional as F

from .checkpoint import SafeCheckpointer, verify_checkpoint
from .utils.errors import UserError
from .utils.io import atomic_torch_save, atomic_write_json

__all__ = [
    "BridgeError",
    "BridgeReport",
    "bridge_state_dict",
    "bridge_checkpoint",
    "load_model_state",
    "load_weights_strictly",
    "EXPLODED_WEIGHT",
    "unhealthy_weights",
    "CLASS_SPECIFIC",
]

logger = logging.getLogger(__name__)

# Layers whose shape depends on the number of classes.
CLASS_SPECIFIC = re.compile(
    r"(box_predictor(\.\d+)?\.(cls_score|bbox_pred)|mask_head\.predictor|head\.cls_score)"
    r"\.(weight|bias)$"
)
POSITION_TABLE = "relative_position_bias_table"
_MAX_LISTED = 20


class BridgeError(UserError, ValueError):
    """The checkpoint does not fit the target model; the message names the keys."""


@dataclass
class BridgeReport:
    """What happened to every key. ``converted`` maps a norm module to its conversion."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    converted: dict[str, str] = field(default_factory=dict)
    reinitialised: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"bridge from {self.source or 'state dict'}: {len(self.loaded)} loaded, "
            f"{len(self.converted)} norm layers converted, {len(self.reinitialised)} "
            f"re-initialised, {len(self.ignored)} ignored"
        )


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a Detectron2 checkpoint (``.pth``), loaded safely.

    Raises:
        DamagedCheckpointError: the file differs from the checksum recorded when it was
            written (see :func:`direct_pretrain.checkpoint.verify_checkpoint`).
        BridgeError: it cannot be read as a torch file or holds no model state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise BridgeError(f"checkpoint '{path}' cannot be read as a torch file: {e}") from e
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BridgeError(f"checkpoint '{path}' holds no model state dict")
    # Checkpoints saved from a DistributedDataParallel model carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def resize_position_table(table: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, str]:
    """Resize a Swin relative position bias table ((2W-1)^2, heads) to another window size.

    The table is a (2W-1) x (2W-1) grid of biases per head; it is resized bicubically, as
    when a Swin model is transferred to another window size.
    """
    old_side, new_side = math.isqrt(table.shape[0]), math.isqrt(shape[0])
    if old_side**2 != table.shape[0] or new_side**2 != shape[0]:
        raise BridgeError(
            f"relative position table of shape {tuple(table.shape)} -> "
            f"{tuple(shape)} is not a square grid"
        )
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, old_side, old_side).float()
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    note = (
        f"relative position table {old_side}x{old_side} -> {new_side}x{new_side} "
        "(window size changed; bicubic)"
    )
    return resized.reshape(heads, -1).T.contiguous().to(table.dtype), note


def _norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _has_stats(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))


def bridge_state_dict(
    source: Mapping[str, torch.Tensor],
    target: nn.Module,
    *,
    reinit_on_class_change: bool = True,
    drop: Iterable[str] = (),
    select: str = "",
    source_name: str = "",
) -> tuple[dict[str, torch.Tensor], BridgeReport]:
    """Map ``source`` weights onto ``target``'s state dict.

    Args:
        source: state dict of the trained model.
        target: the model of the next phase (its own initial values fill re-initialised keys).
        reinit_on_class_change: re-initialise class-specific predictor layers whose shape
            differs or that the source lacks; otherwise that is an error.
        drop: regular expressions of target keys to re-initialise whatever the source holds.
        select: if not empty, a regular expression: only target keys matching it are taken from
            the source, the others keep their initial values (reported as re-initialised).
        source_name: shown in the report.

    Returns:
        The complete state dict for ``target`` and the report.

    Raises:
        BridgeError: a target weight is missing or mis-shaped (outside the predictor), or a
            norm layer cannot be converted.
    """
    report = BridgeReport(source=source_name)
    target_state = target.state_dict()
    norms = _norm_modules(target)
    drop_patterns = [re.compile(p) for p in drop]
    selected = re.compile(select) if select else None
    out: dict[str, torch.Tensor] = {}
    errors: list[str] = []

    for name, module in norms.items():
        if selected and not selected.search(f"{name}.weight"):
            continue
        src_has_stats = f"{name}.running_mean" in source
        trainable_source = f"{name}.num_batches_tracked" in source
        if src_has_stats and not _has_stats(module):
            errors.append(
                f"{name}: BatchNorm statistics in the checkpoint cannot become "
                f"{type(module).__name__} (use BN, SyncBN, naiveSyncBN or FrozenBN)"
            )
        elif trainable_source and type(module) is not nn.BatchNorm2d:
            report.converted[name] = f"BatchNorm -> {type(module).__name__}"

    for key, init in target_state.items():
        module = key.rpartition(".")[0]
        reinit_ok = reinit_on_class_change and CLASS_SPECIFIC.search(key)
        if any(p.search(key) for p in drop_patterns):
            out[key] = init
            report.reinitialised[key] = "dropped by request"
        elif selected and not selected.search(key):
            out[key] = init
            report.reinitialised[key] = f"not selected by '{select}'"
        elif key.endswith("num_batches_tracked") and key not in source and module in norms:
            out[key] = init  # the source norm was frozen: the step counter starts at 0
            report.converted[module] = f"FrozenBatchNorm -> {type(norms[module]).__name__}"
        elif key not in source:
            if reinit_ok:
                out[key] = init
                report.reinitialised[key] = "absent from the checkpoint"
            else:
                errors.append(f"{key}: missing from the checkpoint")
        elif source[key].shape != init.shape:
            shapes = f"{tuple(source[key].shape)} in the checkpoint, {tuple(init.shape)} here"
            if key.endswith(POSITION_TABLE) and source[key].shape[1:] == init.shape[1:]:
                out[key], report.converted[key] = resize_position_table(source[key], init.shape)
            elif reinit_ok:
                out[key] = init
                report.reinitialised[key] = f"class count changed: {shapes}"
            else:
                errors.append(f"{key}: shape {shapes}")
        else:
            out[key] = source[key].to(init.dtype)
            if module not in report.converted:
                report.loaded.append(key)

    for key in source:
        if key not in target_state:
            module = key.rpartition(".")[0]
            report.ignored[key] = (
                f"BatchNorm step counter, unused by {type(norms[module]).__name__}"
                if key.endswith("num_batches_tracked") and module in norms
                else "not in the target model"
            )
    if errors:
        raise BridgeError(
            f"checkpoint {source_name or ''} does not fit the model "
            f"({len(errors)} problem(s); was it trained with another architecture?):"
            + _listing(errors)
        )
    return out, report


# A trained parameter larger than this in magnitude means training blew up: detectors trained
# here stay far below it (their largest weights are of order 10-100); a measured blow-up with a
# too-high LR reached 4e11 while every loss still looked finite.
EXPLODED_WEIGHT = 1e6


def unhealthy_weights(state: Mapping[str, torch.Tensor], bound: float = EXPLODED_WEIGHT) -> str:
    """What is wrong with a model's weights ("" if nothing): non-finite values anywhere, or
    values beyond ``bound`` in magnitude (norm statistics excepted: activations' variance may
    legitimately be large)."""
    non_finite, exploded, largest = [], [], 0.0
    for key, value in state.items():
        if not torch.is_floating_point(value) or value.numel() == 0:
            continue
        if not bool(torch.isfinite(value).all()):
            non_finite.append(key)
            continue
        peak = float(value.abs().max())
        if peak > bound and not key.endswith(("running_mean", "running_var")):
            exploded.append(key)
            largest = max(largest, peak)
    problems = []
    if non_finite:
        problems.append(f"non-finite values in {_inline(non_finite)}")
    if exploded:
        problems.append(f"values up to {largest:.3g} (beyond {bound:g}) in {_inline(exploded)}")
    return "; ".join(problems)


def _inline(keys: list[str]) -> str:
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def bridge_checkpoint(
    source_path: str | Path,
    target: nn.Module,
    output_path: str | Path,
    *,
    reinit_on_class_change: bool = True,
    drop: Iterable[str] = (),
    select: str = "",
) -> BridgeReport:
    """Bridge the checkpoint at ``source_path`` into ``target`` and save it to ``output_path``.

    Writes ``output_path`` (a Detectron2 checkpoint with the model only) and
    ``<output_path stem>_report.json``, both atomically. Keyword arguments are those of
    :func:`bridge_state_dict`.
    """
    source = load_model_state(source_path)
    problem = unhealthy_weights(source)
    if problem:
        raise BridgeError(f"not bridging {source_path}: its weights are broken ({problem})")
    state, report = bridge_state_dict(
        source,
        target,
        reinit_on_class_change=reinit_on_class_change,
        drop=drop,
        select=select,
        source_name=str(source_path),
    )
    output_path = Path(output_path)
    atomic_write_json(report_path(output_path), asdict(report))
    atomic_torch_save({"model": state, "__author__": "direct_pretrain bridge"}, output_path)
    logger.info(report.summary())
    for key, why in report.reinitialised.items():
        logger.info("  re-initialised %s (%s)", key, why)
    return report


def report_path(bridged: str | Path) -> Path:
    """Where :func:`bridge_checkpoint` writes the report of ``bridged``."""
    bridged = Path(bridged)
    return bridged.with_name(f"{bridged.stem}_report.json")


def load_weights_strictly(model, weights: str) -> None:
    """Load ``weights`` into ``model``; a checkpoint that does not fit is an error naming the
    keys (norm statistics convert as in the bridge). Legacy ``.pkl`` files go through
    Detectron2's name-matching loader."""
    if weights.endswith(".pkl"):
        SafeCheckpointer(model).load(weights)
        return
    state, report = bridge_state_dict(
        load_model_state(weights), model, reinit_on_class_change=False, source_name=weights
    )
    model.load_state_dict(state)
    logger.info(report.summary())
