"""The plan: both phases sized from the data and a time budget (``DIRECT_PRETRAIN.BUDGET_MINUTES``).

:func:`make_plan` applies the rules of :mod:`.rules` to the training set, keeps every key the
user set (marked "yours", with the figure the rule would have used, and a warning where the
value looks harmful), times each phase's training step at its planned sizes (calibration) and
splits the budget into each phase's epochs. :func:`apply_plan` writes the planned values (and
the re-plans of :mod:`.replan`) into a config. The plan is saved as ``OUTPUT_DIR/plan.yaml``
and reused as long as its inputs (config, data, budget, device) are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Iterable

import torch
import yaml
from detectron2.utils import comm

from ..config import lookup
from ..config_systems import ConfigSystem
from ..engine import time_steps
from ..phase_kinds import PhaseConfigError
from ..phases import active_phases
from ..run_folder import PHASE_SAFE_KEYS
from ..utils.io import atomic_write_text, plain
from .rules import (
    CPU_BATCH,
    CPU_BATCH_CAP,
    GPU_BATCH_CAP,
    MIN_ITERATIONS,
    PROBE_SHARE,
    Choice,
    DataFigures,
    anchor_recall,
    anchor_warning,
    batch_and_lr,
    budget_crop,
    choose_anchor_sizes,
    cpu_batch,
    feature_strides,
    finetune_scale,
    finetune_sizes,
    phase_schedule,
    pretrain_scale,
    pretrain_sizes,
    recall_text,
    roi_batch,
    schedule_split,
)

__all__ = [
    "PLAN_FILE",
    "PLANNED_PHASES",
    "Planner",
    "calibrate_phase",
    "fit_crop",
    "phase_key",
    "plan_schedules",
    "apply_plan",
    "make_plan",
    "plan_inputs",
    "plan_table",
    "read_plan",
    "write_plan",
]

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.yaml"
PLANNED_PHASES = ("PRETRAIN", "FINETUNE")
# Keys of a phase planned together: one of them set by the user keeps the whole group.
SIZE_KEYS = (
    "AUGMENTATION",
    "SCALE",
    "CROP_SIZE",
    "RATIO_RANGE",
    "MIN_SIZE_TRAIN",
    "MAX_SIZE_TRAIN",
    "MIN_SIZE_TEST",
    "MAX_SIZE_TEST",
)
LENGTH_KEYS = ("EPOCHS", "MAX_ITER", "DATASET_REPEAT", "STEP_EPOCHS", "WARMUP_ITERS")
# Size keys a phase does not read, per AUGMENTATION.
_UNUSED = {
    "fixed_size_crop": ("MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN"),
    "shortest_edge": ("SCALE", "CROP_SIZE", "RATIO_RANGE"),
}
# Shares of the GPU's memory the planned batch may fill.
GPU_MEMORY_SHARE = 0.8


def _set_where(where: str) -> str:
    """ "set in FILE" or "set on the command line"."""
    return f"set {'on' if where == 'the command line' else 'in'} {where}"


def phase_key(phase: str, key: str) -> str:
    return f"DIRECT_PRETRAIN.{phase}.{key}"


def plan_inputs(
    system: ConfigSystem, cfg, data_digests: dict[str, str], user: dict, num_images: int
) -> dict:
    """What a plan depends on: the config (less the keys a resume may change), the data, the
    budget, the device and the keys the user set. A saved plan is reused while they are equal."""
    safe = {*system.resume_safe_keys, "DIRECT_PRETRAIN.PHASE"}
    safe |= {phase_key(p, k) for p in PLANNED_PHASES for k in PHASE_SAFE_KEYS}
    flat = {
        k: v
        for k, v in system.flat(cfg).items()
        if k not in safe and not k.lower().startswith("model.pixel_")
    }
    text = json.dumps(flat, sort_keys=True, default=str)
    return {
        "budget_minutes": float(cfg.DIRECT_PRETRAIN.BUDGET_MINUTES),
        "device": active_device(system, cfg),
        "data": dict(sorted(data_digests.items())),
        "num_images": int(num_images),
        "config": hashlib.sha256(text.encode()).hexdigest()[:16],
        "yours": sorted(k for k in user if k not in safe and _plannable(k)),
    }


def _plannable(key: str) -> bool:
    return key.startswith("DIRECT_PRETRAIN.") or "anchor" in key.lower()


def active_device(system: ConfigSystem, cfg) -> str:
    return system.resolve(cfg, active_phases(cfg)[0]).DEVICE


class Planner:
    """Collects the choices of one plan; a key the user set is kept and marked."""

    def __init__(self, system: ConfigSystem, cfg, user: dict) -> None:
        self.system, self.cfg, self.user = system, cfg, user
        self.choices: list[Choice] = []

    def keep_group(self, phase: str, keys: Iterable[str]) -> bool:
        return any(phase_key(phase, k) in self.user for k in keys)

    def add(self, phase: str | None, choice: Choice) -> None:
        key = choice.key if phase is None else phase_key(phase, choice.key)
        if key in self.user:
            current = plain(lookup(self.cfg, key))
            choice = Choice(key, current, _set_where(self.user[key]), choice.figure, yours=True)
        else:
            choice = Choice(key, plain(choice.value), choice.rule, choice.figure)
        self.choices.append(choice)

    def keep(self, phase: str, keys: Iterable[str], figure: str) -> None:
        """Record a group the user set part of: its values stay the config's (those the phase
        uses: a fixed-size-crop phase ignores MIN/MAX_SIZE_TRAIN, a shortest-edge one SCALE,
        CROP_SIZE and RATIO_RANGE)."""
        named = [k for k in keys if phase_key(phase, k) in self.user]
        unused = _UNUSED[self.system.resolve(self.cfg, phase).AUGMENTATION]
        for key in keys:
            full = phase_key(phase, key)
            where = self.user.get(full)
            if key in unused and not where:
                continue
            rule = _set_where(where) if where else f"kept with {', '.join(named)} (yours)"
            value = plain(lookup(self.cfg, full))
            self.choices.append(
                Choice(full, value, rule, figure, yours=bool(where), kept=not where)
            )

    def replace(self, phase: str, choices: list[Choice], drop: Iterable[str] = ()) -> None:
        """Put ``choices`` in place of the planned ones of the same keys (and of ``drop``)."""
        gone = {phase_key(phase, k) for k in [*drop, *(c.key for c in choices)]}
        self.choices = [c for c in self.choices if c.key not in gone or c.yours]
        for choice in choices:
            self.add(phase, choice)

    def values(self) -> dict:
        return {c.key: c.value for c in self.choices if not (c.yours or c.kept) and "." in c.key}


def _phase_scale(system: ConfigSystem, cfg, name: str, data: DataFigures) -> float:
    height, width = data.image_size
    return system.resolve(cfg, name).train_scale(height, width)


def make_plan(
    system: ConfigSystem, cfg, dicts: list[dict], user: dict, inputs: dict, calibrate=time_steps
) -> dict:
    """The plan of ``cfg`` for the training set ``dicts`` (each process makes its own; the
    pipeline keeps the main process's).

    Args:
        system: the config's system.
        cfg: the pipeline config with ``DIRECT_PRETRAIN.BUDGET_MINUTES`` > 0.
        dicts: the training set's dataset dicts.
        user: ``{key: where}`` of the keys the user set (kept).
        inputs: :func:`plan_inputs` of the config.
        calibrate: times a resolved phase config's training step (``time_steps``).

    Raises:
        PhaseConfigError: a pipeline with phases the planner does not plan.
    """
    start = time.perf_counter()
    phases = pipeline_phases(cfg)
    data = DataFigures.of(dicts)
    device = inputs["device"]
    planner = Planner(system, cfg, user)
    scales: dict[str, float] = {}
    if "FINETUNE" in phases:
        if planner.keep_group("FINETUNE", SIZE_KEYS):
            scales["FINETUNE"] = _phase_scale(system, cfg, "FINETUNE", data)
            planner.keep("FINETUNE", SIZE_KEYS, _p10(data, scales["FINETUNE"]))
        else:
            scales["FINETUNE"] = float(finetune_scale(data).value)
            for choice in finetune_sizes(data, scales["FINETUNE"], device):
                planner.add("FINETUNE", choice)
    if "PRETRAIN" in phases:
        if planner.keep_group("PRETRAIN", SIZE_KEYS):
            scales["PRETRAIN"] = _phase_scale(system, cfg, "PRETRAIN", data)
            planner.keep("PRETRAIN", SIZE_KEYS, _p10(data, scales["PRETRAIN"]))
        else:
            base = scales.get("FINETUNE", float(finetune_scale(data).value))
            scales["PRETRAIN"] = float(pretrain_scale(data, base).value)
            for choice in pretrain_sizes(data, scales["PRETRAIN"], device):
                planner.add("PRETRAIN", choice)
    _plan_anchors(planner, data, scales)
    for phase in phases:
        planned = system.resolve(system.with_values(cfg, planner.values()), phase)
        crop = planned.CROP_SIZE if planned.AUGMENTATION == "fixed_size_crop" else None
        if system.has_roi_heads(cfg):
            planner.add(phase, roi_batch(data, scales[phase], crop))
        if planner.keep_group(phase, ("IMS_PER_BATCH",)):  # the LR follows your batch
            yours = system.resolve(cfg, phase).IMS_PER_BATCH
            for choice in batch_and_lr(Choice("IMS_PER_BATCH", yours, "yours")):
                planner.add(phase, choice)
    calibration = {}
    for phase in phases:
        planned_cfg = system.with_values(cfg, planner.values())
        if planner.keep_group(phase, ("IMS_PER_BATCH",)):
            calibration[phase] = calibrate_phase(system, planned_cfg, phase, inputs, calibrate)
            continue
        if device.startswith("cuda"):
            batch = _gpu_batch(system, planned_cfg, phase, inputs, calibrate)
            planned_cfg = _with_batch(system, planned_cfg, phase, batch.value)
            calibration[phase] = calibrate_phase(system, planned_cfg, phase, inputs, calibrate)
        else:
            batch, calibration[phase] = _cpu_batch(system, planned_cfg, phase, inputs, calibrate)
        for choice in batch_and_lr(batch):
            planner.add(phase, choice)
    budget, free = _split_budget(planner, system, cfg, phases, scales, calibration, inputs)
    for phase in free:
        if not planner.keep_group(phase, SIZE_KEYS):
            fit_crop(
                planner, data, phase, scales[phase], budget[phase], calibration, inputs, calibrate
            )
    plan_schedules(planner, system, cfg, free, budget, calibration, inputs)
    for phase in free:
        speed = calibration[phase]["seconds_per_iter"]
        if budget[phase] < MIN_ITERATIONS * speed:
            logger.warning(
                "Plan: phase %s gets %.0f s of the budget, under %d iterations (%.1f s each): "
                "it runs %d.",
                phase,
                budget[phase],
                MIN_ITERATIONS,
                speed,
                MIN_ITERATIONS,
            )
    return {
        "inputs": inputs,
        "fingerprint": {
            "images": len(dicts),
            "boxes": int(len(data.sides)),
            "box_side_px_p10_p50_p90": [round(data.side(p), 1) for p in (10, 50, 90)],
            "image_size_p50": [round(v) for v in data.image_size],
        },
        "scales": {k: round(v, 4) for k, v in scales.items()},
        "calibration": calibration,
        "budget_seconds": budget,
        "choices": [c.row() for c in planner.choices],
        "values": planner.values(),
        "planning_seconds": round(time.perf_counter() - start, 1),
    }


def pipeline_phases(cfg) -> list[str]:
    """The pipeline's phases, all of which the planner must know how to plan."""
    phases = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    unknown = [p for p in phases if p not in PLANNED_PHASES]
    if unknown:
        raise PhaseConfigError(
            f"DIRECT_PRETRAIN.BUDGET_MINUTES plans the phases {', '.join(PLANNED_PHASES)}; "
            f"DIRECT_PRETRAIN.PIPELINE also has {', '.join(unknown)}: set those phases' keys "
            "yourself and DIRECT_PRETRAIN.BUDGET_MINUTES 0"
        )
    return phases


def _p10(data: DataFigures, scale: float) -> str:
    return f"10th-percentile box {data.side(10) * scale:.1f} px at your size"


def _plan_anchors(planner: Planner, data: DataFigures, scales: dict[str, float]) -> None:
    layout = planner.system.anchor_layout(planner.cfg)
    if layout is None:
        return
    sizes_key, ratios_key, features = layout
    strides = feature_strides(features)
    sizes = plain(lookup(planner.cfg, sizes_key))
    ratios = plain(lookup(planner.cfg, ratios_key))
    if sizes_key in planner.user or None in strides or len(sizes) != len(strides):
        recall = {n: anchor_recall(data.box_wh * s, sizes, ratios) for n, s in scales.items()}
        warning = anchor_warning(sizes_key, sizes, recall)
        why = _set_where(planner.user[sizes_key]) if sizes_key in planner.user else "kept"
        planner.choices.append(
            Choice(sizes_key, sizes, why, recall_text(recall), yours=True, warning=warning)
        )
        return
    planner.add(None, choose_anchor_sizes(sizes_key, data, scales, sizes, ratios, strides))


def calibrate_phase(system: ConfigSystem, cfg, phase: str, inputs: dict, calibrate) -> dict:
    """Time phase ``phase``'s training step. It runs from random weights: a frozen-BN backbone
    (meant for trained weights) is timed with BN, which costs slightly more (the plan errs on
    the safe side) and does not overflow."""
    resolved = system.resolve(cfg, phase)
    note = {}
    if resolved.BACKBONE_NORM == "FrozenBN":
        cfg = system.with_values(cfg, {phase_key(phase, "BACKBONE_NORM"): "BN"})
        resolved = system.resolve(cfg, phase)
        note = {"timed_with": "BACKBONE_NORM BN in place of FrozenBN (random weights)"}
    pcfg = system.phase_config(cfg, resolved, inputs["num_images"])
    timing = {**calibrate(pcfg), **note}
    logger.info(
        "Plan: calibrating phase %s: %.2f s per iteration of %d images",
        phase,
        timing["seconds_per_iter"],
        resolved.IMS_PER_BATCH,
    )
    return {**timing, "ims_per_batch": resolved.IMS_PER_BATCH}


def _input_side(resolved) -> int:
    """The long side (px) of a resolved phase's training inputs: its crop, else its resize."""
    if resolved.AUGMENTATION == "fixed_size_crop":
        return max(resolved.CROP_SIZE)
    return max(resolved.MAX_SIZE_TRAIN, *resolved.MIN_SIZE_TRAIN)


def _with_batch(system: ConfigSystem, cfg, phase: str, batch: int):
    return system.with_values(cfg, {phase_key(phase, "IMS_PER_BATCH"): batch})


def _gpu_batch(system: ConfigSystem, cfg, phase: str, inputs: dict, calibrate) -> Choice:
    """The total batch whose per-GPU part is the largest power of two that, extrapolated from
    the memory of a probe at the CPU batch, fits ``GPU_MEMORY_SHARE`` of the GPU (capped)."""
    world = comm.get_world_size()
    probe = max(1, CPU_BATCH[phase] // world)
    probe_cfg = _with_batch(system, cfg, phase, probe * world)
    peak = calibrate_phase(system, probe_cfg, phase, inputs, calibrate)["peak_mb"]
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    fits = GPU_MEMORY_SHARE * total / max(peak / probe, 1.0)
    per_gpu = 2 ** max(0, int(math.log2(max(1.0, fits))))
    return Choice(
        "IMS_PER_BATCH",
        int(min(GPU_BATCH_CAP[phase], per_gpu * world)),
        f"GPU: the largest batch whose measured memory fits {GPU_MEMORY_SHARE:.0%} of the GPU",
        f"{peak:.0f} MB per GPU at {probe} images, of {total:.0f} MB",
    )


def _cpu_batch(system: ConfigSystem, cfg, phase: str, inputs: dict, calibrate):
    """The CPU batch (:func:`.rules.cpu_batch`: doubling from ``CPU_BATCH`` while it pays; a
    doubling whose steps would cost over ``PROBE_SHARE`` of the budget is not timed) and its
    timing. A doubling that wins is checked against the batch before it, timed again: a run's
    first timing reads its images cold (measured: 3.3 images/s at batch 8, then 3.8), and each
    batch keeps its fastest timing."""
    timings: dict[int, dict] = {}

    def time_batch(batch: int) -> None:
        probe = _with_batch(system, cfg, phase, batch)
        timing = calibrate_phase(system, probe, phase, inputs, calibrate)
        if batch not in timings or timing["seconds_per_iter"] < timings[batch]["seconds_per_iter"]:
            timings[batch] = timing

    def chosen() -> int:
        return cpu_batch({b: t["seconds_per_iter"] for b, t in timings.items()}).value

    batch, note = CPU_BATCH[phase], ""
    time_batch(batch)
    while 2 * batch <= CPU_BATCH_CAP[phase]:
        timing = timings[batch]
        cost = 2 * timing["seconds_per_iter"] * (timing["steps"] + timing.get("warmup", 0))
        if cost > PROBE_SHARE * 60.0 * inputs["budget_minutes"]:
            note = f"; {2 * batch} not timed (~{cost:.0f} s, over {PROBE_SHARE:.0%} of the budget)"
            break
        time_batch(2 * batch)
        if chosen() == 2 * batch:
            time_batch(batch)
        if chosen() != 2 * batch:
            break
        batch *= 2
    timed = {b: t["seconds_per_iter"] for b, t in sorted(timings.items())}
    choice = cpu_batch(timed)
    side = _input_side(system.resolve(cfg, phase))
    choice = dataclasses.replace(choice, figure=f"{choice.figure} at {side}-px inputs{note}")
    return choice, {**timings[choice.value], "timed_batches": timed}


def _split_budget(planner, system, cfg, phases, scales, calibration, inputs):
    """Each phase's training seconds (those whose length the user set take their calibrated
    time), and the phases whose length the plan sets."""
    total = 60.0 * inputs["budget_minutes"]
    planned_cfg = system.with_values(cfg, planner.values())
    fixed = {}
    for phase in phases:
        if planner.keep_group(phase, ("EPOCHS", "MAX_ITER")):
            resolved = system.resolve(planned_cfg, phase)
            iters, _ = resolved.schedule(inputs["num_images"])
            fixed[phase] = iters * calibration[phase]["seconds_per_iter"]
            planner.keep(phase, LENGTH_KEYS, f"{iters} iterations: {fixed[phase] / 60:.1f} min")
    free = [p for p in phases if p not in fixed]
    left = max(0.0, total - sum(fixed.values()))
    seconds = dict(fixed)
    if len(free) == 2:
        change = scales["FINETUNE"] / scales["PRETRAIN"]
        share = schedule_split(change)
        planner.choices.append(
            Choice("budget share of FINETUNE", round(share.value, 3), share.rule, share.figure)
        )
        seconds["FINETUNE"] = left * float(share.value)
        seconds["PRETRAIN"] = left - seconds["FINETUNE"]
    elif free:
        seconds[free[0]] = left
    if sum(fixed.values()) > total:
        warning = (
            f"the phases whose length you set ({', '.join(fixed)}) take "
            f"{sum(fixed.values()) / 60:.1f} of the {total / 60:.1f} minutes of "
            "DIRECT_PRETRAIN.BUDGET_MINUTES at the calibrated speed"
        )
        planner.choices.append(
            Choice("budget", inputs["budget_minutes"], "yours", yours=True, warning=warning)
        )
    return {k: round(v, 1) for k, v in seconds.items()}, free


def fit_crop(planner, data, phase, scale, seconds, calibration, inputs, calibrate) -> None:
    """Smaller crops for a phase the budget pays too few epochs at its planned input
    (:func:`.rules.budget_crop`), timed again."""
    system, cfg = planner.system, planner.cfg
    resolved = system.resolve(system.with_values(cfg, planner.values()), phase)
    side = _input_side(resolved)
    speed = calibration[phase]["seconds_per_iter"]
    epochs = seconds / speed * resolved.IMS_PER_BATCH / max(1, inputs["num_images"])
    choices = budget_crop(data, phase, scale, side, epochs)
    if choices is None:
        return
    planner.replace(phase, choices, drop=("MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN"))
    if system.has_roi_heads(cfg):
        crop = tuple(next(c.value for c in choices if c.key == "CROP_SIZE"))
        planner.replace(phase, [roi_batch(data, scale, crop)])
    planned_cfg = system.with_values(cfg, planner.values())
    calibration[phase] = calibrate_phase(system, planned_cfg, phase, inputs, calibrate)


def plan_schedules(planner, system, cfg, free, seconds, calibration, inputs) -> None:
    """The length keys of each phase the plan sizes, filling its seconds."""
    planned_cfg = system.with_values(cfg, planner.values())
    for phase in free:
        planned = system.resolve(planned_cfg, phase)
        speed = calibration[phase]["seconds_per_iter"]
        for choice in phase_schedule(
            phase, seconds[phase], speed, planned.IMS_PER_BATCH, inputs["num_images"]
        ):
            planner.add(phase, choice)


def apply_plan(system: ConfigSystem, cfg, plan: dict, paced: int | None = None):
    """``cfg`` with the plan's values and the later re-plans' written in: between phases
    (``replanned``), then during them (``paced``: each phase's first ``paced`` only, if given)."""
    values = dict(plan["values"])
    for replanned in plan.get("replanned", {}).values():
        values.update(replanned["values"])
    for changes in plan.get("paced", {}).values():
        for change in changes[:paced]:
            values.update(change["values"])
    return system.with_values(cfg, values)


def write_plan(path: str, plan: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(plan, sort_keys=False))


def read_plan(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def plan_table(plan: dict) -> str:
    """The plan as the user reads it before training: one row per key, then the budget."""
    rows = [("key", "value", "by", "why (data figure)")]
    order = {p: i for i, p in enumerate(PLANNED_PHASES)}

    def phase_of(choice: dict) -> int:
        parts = choice["key"].split(".")
        return order.get(parts[1], -1) if parts[0] == "DIRECT_PRETRAIN" else len(order)

    for c in sorted(plan["choices"], key=phase_of):
        why = c["rule"] + (f" ({c['figure']})" if c.get("figure") else "")
        value = c["value"]
        rows.append((c["key"].removeprefix("DIRECT_PRETRAIN."), _short(value), c["by"], why))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]}" for r in rows]
    budget = plan["inputs"]["budget_minutes"]
    split = ", ".join(
        f"{p} {s / 60:.1f} min at {plan['calibration'][p]['seconds_per_iter']:.2f} s/iteration "
        f"({plan['calibration'][p]['ims_per_batch']} images)"
        for p, s in plan["budget_seconds"].items()
    )
    lines.append(f"Budget {budget:g} min of training ({plan['inputs']['device']}): {split}.")
    if "planning_seconds" in plan:
        lines.append(
            f"Planning took {plan['planning_seconds'] / 60:.1f} min (fingerprint, calibration and "
            "batch timings), not counted in the budget."
        )
    return "\n".join(lines)


def _short(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
