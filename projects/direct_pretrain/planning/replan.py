"""Re-planning a budgeted run while it trains: the next phase after the one before it ended
(:func:`replan_after`: its length from the time really taken, and a short fine-tune's scale
measured on the validation slice), and a phase that runs off its calibrated speed
(:func:`replan_pace`). Each re-plan is saved in ``plan.yaml`` and applied by
:func:`.plan.apply_plan`."""

from __future__ import annotations

import logging
import time
from typing import Callable

from detectron2.utils import comm

from ..config_systems import ConfigSystem
from ..engine import time_steps
from ..final_choice import SliceScorer
from ..utils.io import plain
from .plan import (
    Planner,
    apply_plan,
    calibrate_phase,
    fit_crop,
    phase_key,
    plan_schedules,
)
from .rules import (
    ADAPT_ITERATIONS,
    MIN_ITERATIONS,
    Choice,
    DataFigures,
    finetune_candidates,
    finetune_sizes,
    phase_schedule,
    pick_measured_scale,
    roi_batch,
)

__all__ = ["budget_seconds", "phase_budget", "replan_after", "replan_pace"]

logger = logging.getLogger(__name__)

# A phase's re-planned length replaces the planned one when they differ by more than this.
REPLAN_TOLERANCE = 0.1


def budget_seconds(plan: dict) -> dict[str, float]:
    """Each phase's share of the budget in training seconds, as re-planned after the phase
    before it."""
    seconds = dict(plan["budget_seconds"])
    for replanned in plan.get("replanned", {}).values():
        seconds[replanned["phase"]] = replanned["seconds"]
    return seconds


def phase_budget(plan: dict, phase: str) -> float | None:
    """``phase``'s :func:`budget_seconds`, or None where the user set its length."""
    if phase_key(phase, "MAX_ITER") not in plan["values"]:
        return None
    return budget_seconds(plan)[phase]


def replan_pace(plan: dict, phase: str, change) -> dict:
    """A re-plan of ``phase`` during its training (a :class:`~direct_pretrain.engine.PaceChanged`:
    it ran off its calibrated speed): its length in iterations, which keeps its LR steps at the
    same share of it, and evaluation every quarter."""
    calibrated = plan["calibration"][phase]["seconds_per_iter"]
    values = {
        phase_key(phase, "MAX_ITER"): int(change.iterations),
        phase_key(phase, "EVAL_PERIOD"): max(1, int(change.iterations) // 4),
    }
    reason = (
        f"phase {phase} trains at {change.seconds_per_iter:.2f} s per iteration "
        f"({change.seconds_per_iter / calibrated:.2f}x its calibration, {calibrated:.2f} s): "
        f"after {change.done} iterations in {change.seconds:.0f} of its "
        f"{phase_budget(plan, phase):.0f} s, {change.iterations} iterations fit instead of "
        f"{change.planned}"
    )
    return {
        "done": int(change.done),
        "seconds_per_iter": round(float(change.seconds_per_iter), 3),
        "values": {k: v for k, v in values.items() if k in plan["values"]},
        "reason": reason,
    }


def replan_after(
    system: ConfigSystem,
    cfg,
    plan: dict,
    done: str,
    record: dict,
    measure: SliceScorer | None = None,
    train_dicts: Callable[[], list[dict]] | None = None,
    calibrate=time_steps,
) -> dict | None:
    """Re-plan the phase after ``done`` once ``done`` finished (its ``phase_done.json``
    ``record``); None if nothing changes.

    Its length follows the training seconds ``done`` really took, so that the budget holds,
    and its speed ``done``'s drift from its calibration (a phase that kept pace,
    :class:`~direct_pretrain.engine.BudgetPace`, ended on time but may have run slower).
    With ``measure`` (scores ``done``'s model on the validation slice at a test size) and
    ``train_dicts`` (loads the training set, only when a measurement is due), a short fine-tune
    whose sizes the plan set gets the scale measured best (:func:`.rules.pick_measured_scale`):
    its sizes, RoIs and length are planned again at that scale and timed. Saved in
    ``plan.yaml``, a re-plan is kept on rerun.
    """
    phases = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    index = phases.index(done) if done in phases else -1
    if index < 0 or index + 1 >= len(phases):
        return None
    phase = phases[index + 1]
    if phase_key(phase, "EPOCHS") not in plan["values"]:
        return None  # the user set its length
    used = float(record["wall_seconds"]) - float(record.get("eval_seconds", 0.0))
    calibrated = plan["calibration"][done]["seconds_per_iter"]
    drift = (used / max(1, record["iterations"])) / calibrated
    spent = sum(plan["budget_seconds"][p] for p in phases[:index] if p in plan["budget_seconds"])
    left = max(0.0, 60.0 * plan["inputs"]["budget_minutes"] - spent - used)
    planned = sum(plan["budget_seconds"][p] for p in phases[index + 1 :])
    seconds = left * plan["budget_seconds"][phase] / planned if planned else left
    timing = (
        f"phase {done} trained {used:.0f} s (planned {plan['budget_seconds'][done]:.0f} s; "
        f"{drift:.2f}x the calibrated time per iteration): phase {phase} gets {seconds:.0f} s "
        f"(planned {plan['budget_seconds'][phase]:.0f} s)"
    )
    entry = {"phase": phase, "seconds": round(seconds, 1)}
    speed = plan["calibration"][phase]["seconds_per_iter"] * drift
    if seconds < MIN_ITERATIONS * speed:
        entry["warning"] = (
            f"phase {done} took {used:.0f} s of the budget ({drift:.2f}x its calibrated time per "
            f"iteration: was the machine shared?), leaving phase {phase} {seconds:.0f} s, under "
            f"{MIN_ITERATIONS} iterations: it runs {MIN_ITERATIONS} and may end below phase "
            f"{done}; raise DIRECT_PRETRAIN.BUDGET_MINUTES or train on an idle machine"
        )
    measurable = measure is not None and train_dicts is not None
    measurable = measurable and _measurable(plan, done, phase)
    if measurable and seconds / speed >= ADAPT_ITERATIONS:
        measurable = False
        if comm.is_main_process():
            logger.info(
                "Plan: phase %s gets %.0f iterations at scale %.2f, at least %d: enough to adapt "
                "to the change of scale; the scale is not measured.",
                phase,
                seconds / speed,
                plan["scales"][phase],
                ADAPT_ITERATIONS,
            )
    if measurable:
        start = time.perf_counter()
        data = DataFigures.of(train_dicts())
        choice = _measured_scale(plan, done, phase, data, measure)
        entry["measured"] = {**choice.row(), "phase": done}
        if choice.value != plan["scales"][phase]:
            values, speed = _plan_at_scale(
                system, cfg, plan, phase, choice.value, seconds, data, calibrate
            )
            entry["planning_seconds"] = round(time.perf_counter() - start, 1)
            reason = (
                f"{timing} at scale {choice.value:.2f}, {choice.rule} ({choice.figure}), "
                f"timed at {speed:.2f} s per iteration"
            )
            return {**entry, "scale": choice.value, "values": values, "reason": reason}
        timing = f"scale {choice.value:.2f} kept, {choice.rule} ({choice.figure}); {timing}"
        entry["planning_seconds"] = round(time.perf_counter() - start, 1)
    on_time = abs(seconds - plan["budget_seconds"][phase]) <= (
        REPLAN_TOLERANCE * plan["budget_seconds"][phase]
    )
    if on_time and abs(drift - 1.0) <= REPLAN_TOLERANCE:  # (a phase that kept pace ends on time)
        return {**entry, "values": {}, "reason": timing} if "measured" in entry else None
    batch = plan["calibration"][phase]["ims_per_batch"]
    choices = phase_schedule(phase, seconds, speed, batch, plan["inputs"]["num_images"])
    values = {phase_key(phase, c.key): plain(c.value) for c in choices}
    values = {k: v for k, v in values.items() if k in plan["values"]}
    return {**entry, "values": values, "reason": f"{timing} at {speed:.2f} s per iteration"}


def _measurable(plan: dict, done: str, phase: str) -> bool:
    """The plan set ``phase``'s sizes and it fine-tunes ``done``'s model at another scale."""
    return (
        phase == "FINETUNE"
        and done in plan["scales"]
        and phase_key(phase, "AUGMENTATION") in plan["values"]
    )


def _measured_scale(plan: dict, done: str, phase: str, data: DataFigures, measure) -> Choice:
    """The scale of ``phase`` at which ``done``'s model scores best, among the candidates."""
    device = plan["inputs"]["device"]
    scales = finetune_candidates(plan["scales"][done], plan["scales"][phase])
    scored: dict[tuple[int, int], float | None] = {}  # scales may round to one test size
    box_ap = []
    for scale in scales:
        test = {c.key: c.value for c in finetune_sizes(data, scale, device)}
        size = (int(test["MIN_SIZE_TEST"]), int(test["MAX_SIZE_TEST"]))
        if size not in scored:
            scored[size] = measure(*size)
        box_ap.append(scored[size])
    return pick_measured_scale(scales, box_ap, measure.images)


def _plan_at_scale(system, cfg, plan, phase, scale, seconds, data: DataFigures, calibrate):
    """``phase``'s sizes, RoIs and length at ``scale`` filling ``seconds``, timed; the values
    and the seconds per iteration."""
    inputs = plan["inputs"]
    planner = Planner(system, apply_plan(system, cfg, plan), {})
    for choice in finetune_sizes(data, scale, inputs["device"]):
        planner.add(phase, choice)
    if system.has_roi_heads(cfg):
        resolved = system.resolve(system.with_values(planner.cfg, planner.values()), phase)
        crop = resolved.CROP_SIZE if resolved.AUGMENTATION == "fixed_size_crop" else None
        planner.add(phase, roi_batch(data, scale, crop))
    planned_cfg = system.with_values(planner.cfg, planner.values())
    calibration = {phase: calibrate_phase(system, planned_cfg, phase, inputs, calibrate)}
    fit_crop(planner, data, phase, scale, seconds, calibration, inputs, calibrate)
    plan_schedules(planner, system, planner.cfg, [phase], {phase: seconds}, calibration, inputs)
    return planner.values(), calibration[phase]["seconds_per_iter"]
