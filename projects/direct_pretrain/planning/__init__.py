"""Planning a run from its data and a time budget (``DIRECT_PRETRAIN.BUDGET_MINUTES``), and the
data-against-model view every run gets (anchor recall, the box-size figure)."""

from __future__ import annotations

import logging
import os
from typing import Iterable

from detectron2.utils import comm

from ..config import lookup
from ..config_systems import ConfigSystem
from ..phases import active_phases
from ..run_folder import PHASE_KEYS_FILE
from ..utils.errors import UserError
from .figures import plot_box_sizes
from .plan import (
    PLAN_FILE,
    PLANNED_PHASES,
    apply_plan,
    make_plan,
    plan_inputs,
    plan_table,
    read_plan,
    write_plan,
)
from .replan import budget_seconds, phase_budget, replan_after, replan_pace
from .rules import (
    DataFigures,
    anchor_recall,
    anchor_warning,
    feature_strides,
    per_level,
    recall_text,
)

__all__ = [
    "PLAN_FILE",
    "PLANNED_PHASES",
    "PlanChangedError",
    "apply_plan",
    "budget_seconds",
    "describe_anchors",
    "make_plan",
    "phase_budget",
    "planned_config",
    "plan_table",
    "read_plan",
    "replan_after",
    "replan_pace",
    "write_plan",
]

logger = logging.getLogger(__name__)

BOX_SIZES_FIGURE = os.path.join("report", "box_sizes.png")


# Plan inputs a refusal shows as "before -> now" (the others are digests or long lists).
_SHOWN_INPUTS = ("budget_minutes", "device", "num_images")
_NAMED = {
    "data": "data (a training dataset's annotation file or image list changed)",
    "config": "config (a key that changes the result)",
    "yours": "the keys you set",
}


class PlanChangedError(UserError, RuntimeError):
    """The run folder holds phases trained with a plan that this command's inputs change."""


def _started(output_dir: str) -> list[str]:
    return sorted(
        entry
        for entry in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, entry, PHASE_KEYS_FILE))
    )


def planned_config(
    system: ConfigSystem,
    cfg,
    dicts: list[dict],
    user: dict,
    data_digests: dict[str, str],
    calibrate=None,
):
    """``cfg`` with its plan applied, and the plan: the saved ``OUTPUT_DIR/plan.yaml`` if its
    inputs are this command's, else a new one (logged as a table by the main process).

    Called on every process: a new plan is made on all of them in step (the calibration's
    loaders build their caches collectively) and the main process's is used and saved.

    Raises:
        PlanChangedError: the saved plan's inputs differ and a phase has started with it.
    """
    output_dir = system.output_dir(cfg)
    path = os.path.join(output_dir, PLAN_FILE)
    inputs = plan_inputs(system, cfg, data_digests, user, len(dicts))
    plan = read_plan(path)
    if plan is not None and plan.get("inputs") == inputs:
        logger.info("Plan: reusing %s (same config, data, budget and device).", path)
    else:
        if plan is not None and _started(output_dir):
            before = plan.get("inputs", {})
            changed = [
                f"{k} {before.get(k)} -> {inputs[k]}" if k in _SHOWN_INPUTS else _NAMED[k]
                for k in sorted(inputs)
                if before.get(k) != inputs[k]
            ]
            raise PlanChangedError(
                f"{output_dir} holds phases ({', '.join(_started(output_dir))}) trained with the "
                f"plan in {path}, which was made with other inputs: {'; '.join(changed)}. Use a "
                "new OUTPUT_DIR, or rerun with what the plan was made for."
            )
        kwargs = {} if calibrate is None else {"calibrate": calibrate}
        plan = comm.all_gather(make_plan(system, cfg, dicts, user, inputs, **kwargs))[0]
        if comm.is_main_process():
            write_plan(path, plan)
        comm.synchronize()
    if comm.is_main_process():
        logger.info("Plan (%s):\n%s", path, plan_table(plan))
        for choice in plan["choices"]:
            if choice.get("warning"):
                logger.warning("Plan: %s.", choice["warning"])
    return apply_plan(system, cfg, plan), plan


def describe_anchors(
    system: ConfigSystem, cfg, dicts: list[dict], output_dir: str, warned: Iterable[str] = ()
) -> dict:
    """Anchor recall at each active phase's training scale (warned when low, unless the anchor
    key is in ``warned``: the plan said it) and the box-size figure ``report/box_sizes.png``;
    returns ``{phase: recall}`` (empty without anchors)."""
    data = DataFigures.of(dicts)
    height, width = data.image_size
    scales = {n: system.resolve(cfg, n).train_scale(height, width) for n in active_phases(cfg)}
    layout = system.anchor_layout(cfg)
    anchors, strides, recall = [], [], {}
    if layout is not None:
        sizes_key, ratios_key, features = layout
        sizes, ratios = _per_level(cfg, sizes_key), _per_level(cfg, ratios_key)
        anchors = sorted({s for level in sizes for s in level})
        strides = [s for s in feature_strides(features) if s is not None]
        recall = {n: anchor_recall(data.box_wh * s, sizes, ratios) for n, s in scales.items()}
        logger.info("Anchors %s: %s", sizes, recall_text(recall))
        warning = anchor_warning(sizes_key, sizes, recall) if len(data.sides) else ""
        if warning and sizes_key not in warned:
            logger.warning("%s.", warning)
    plot_box_sizes(
        data.sides, scales, anchors, strides, recall, os.path.join(output_dir, BOX_SIZES_FIGURE)
    )
    return recall


def _per_level(cfg, dotted: str) -> list[list[float]]:
    return [[float(x) for x in level] for level in per_level(lookup(cfg, dotted))]
