"""The pipeline: pre-train -> bridge -> fine-tune -> evaluate, one folder per phase.

A phase is finished when its folder holds ``phase_done.json`` (written atomically after its
final evaluation); a rerun skips finished phases and resumes an interrupted one from its last
complete, undamaged checkpoint (:class:`~direct_pretrain.checkpoint.SafeCheckpointer`). A phase
folder remembers the config it was started with and a fingerprint of its datasets, and a rerun
with a config or data that would change its result is refused, naming the keys or datasets.
Every phase says in the log whether it is skipped, started, resumed or bridged. At the end it
writes ``summary.json`` (per phase: box AP, AP50, AP75, per object size and per class), matches
the final evaluation's detections to the test set (:mod:`.results`) to save the F1-best score
threshold for prediction, writes the report and logs the AP table. The run's final model is the
last phase's unless an earlier detector phase scores higher on a validation slice held out of
the training set (:mod:`.final_choice`). Works the same
for yacs and LazyConfig configs (:mod:`.config_systems`) and with any number of processes (only the
main process writes files; the others wait for it). Each phase's settings come from
:func:`direct_pretrain.phases.resolve_phase`, through the config system.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Iterator

import torch
from detectron2.data import MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from .batches import draw_batches
from .bridge import (
    bridge_checkpoint,
    load_model_state,
    load_weights_strictly,
    unhealthy_weights,
)
from .checkpoint import DamagedCheckpointError
from .config_systems import ConfigSystem
from .config_systems import changed_direct_pretrain_keys as default_user_keys
from .config_systems import system_of
from .data.datasets import cache_dir, register_named_datasets
from .data.pixel_stats import dataset_pixel_stats
from .engine import BudgetPace, PaceChanged, build_trainer, evaluate
from .final_choice import SliceScorer, choose_final_phase, hold_out_val_slice
from .outcome import (
    ap_text,
    phase_results,
    score_threshold_and_confusion,
    worse_than_earlier,
    write_run_report,
)
from .phase_kinds import config_key_applies
from .phases import Phase, active_phases
from .planning import (
    PLAN_FILE,
    apply_plan,
    budget_seconds,
    describe_anchors,
    phase_budget,
    planned_config,
    read_plan,
    replan_after,
    replan_pace,
    write_plan,
)
from .planning.rules import MIN_ITERATIONS
from .preflight import (
    check_num_classes,
    check_weights_used,
    dataset_fingerprints,
    describe_data,
    warn_left_out_images,
    warn_unused_datasets,
)
from .report import ap_table
from .run_folder import (
    BRIDGED_FILE,
    DONE_FILE,
    FINAL_MODEL,
    FINGERPRINT_FILE,
    PHASE_CONFIG_FILE,
    PHASE_KEYS_FILE,
    PHASE_SAFE_KEYS,
    PIPELINE_CONFIG_FILE,
    SUMMARY_FILE,
    export_for_prediction,
    read_done,
    saved_pixel_stats,
)
from .utils.dist import build_on_main
from .utils.errors import UserError
from .utils.io import (
    atomic_torch_save,
    atomic_write_json,
    ensure_writable_dir,
    remove_partial_files,
)
from .utils.rng import derived_seed

__all__ = [
    "PhaseStateError",
    "evaluate_weights",
    "plan_run",
    "prepare_config",
    "prepare_run",
    "run_pipeline",
]

logger = logging.getLogger(__name__)

# How a phase folder remembers a path inside the run folder.
RUN_DIR_VARIABLE = "$OUTPUT_DIR"
# Phase-key prefix of the dataset fingerprints a phase folder remembers.
DATA_PREFIX = "DATASET_FINGERPRINT."


class PhaseStateError(UserError, RuntimeError):
    """A phase folder holds a run that this config cannot continue."""


def prepare_config(cfg, eval_only: bool = False):
    """Register datasets and check the config before anything runs; warn about training images
    left out for having no usable annotations; describe the data against the phases and
    anchors (a budgeted run does it once planned: :func:`prepare_run`); resolve pixel
    statistics.

    Args:
        cfg: the pipeline config.
        eval_only: only the test sets are needed (no training set, no pixel statistics).

    Returns:
        The config, with the model's pixel mean/std computed from the training set if
        ``DIRECT_PRETRAIN.PIXEL_STATS`` is "dataset", and the number of training images.
    """
    system = system_of(cfg)
    system.check(cfg)
    node = cfg.DIRECT_PRETRAIN
    for key, allowed in (("PIXEL_STATS", ("config", "dataset")), ("BAD_IMAGES", ("stop", "skip"))):
        if node[key] not in allowed:
            raise ValueError(
                f"DIRECT_PRETRAIN.{key} = '{node[key]}' is not one of {', '.join(allowed)}"
            )
    if node.BUDGET_MINUTES < 0:
        raise ValueError(f"DIRECT_PRETRAIN.BUDGET_MINUTES = {node.BUDGET_MINUTES} is negative")
    device = system.device(cfg)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "%s = %s, but no GPU is available: running on CPU.", system.device_key, device
        )
    train_names, test_names = system.split_names(cfg)
    if eval_only:
        train_names = []
    names = [*train_names, *test_names]
    if comm.is_main_process():
        ensure_writable_dir(system.output_dir(cfg))
    build_on_main(lambda: register_named_datasets(node, names), "registering the datasets")
    if comm.is_main_process():
        warn_unused_datasets(node, system.dataset_names(cfg))
    check_num_classes(system.num_classes(cfg), train_names or test_names[:1], test_names)
    if eval_only:
        return cfg, 1
    dicts = system.train_dicts(cfg)
    if comm.is_main_process():
        warn_left_out_images(train_names, len(dicts), system.keep_empty_override)
    if comm.is_main_process() and not _budget(cfg):
        _describe(system, cfg, dicts)
    if node.PIXEL_STATS == "dataset":
        mean, std = build_on_main(
            lambda: dataset_pixel_stats(
                [d["file_name"] for d in dicts],
                system.image_format(cfg),
                node.PIXEL_STATS_MAX_IMAGES,
                cache_dir(node),
                skip_bad=node.BAD_IMAGES == "skip",
            ),
            "pixel statistics",
        )
        cfg = system.with_pixel_stats(cfg, mean, std)
    return cfg, len(dicts)


def _result_keys(system: ConfigSystem, flat: dict, phase: str) -> dict:
    """The config keys that determine a phase's result (other phases' nodes left out)."""
    safe = {*system.resume_safe_keys, *(f"DIRECT_PRETRAIN.{phase}.{k}" for k in PHASE_SAFE_KEYS)}
    return {
        k: v
        for k, v in flat.items()
        if k not in safe
        and (not k.startswith("DIRECT_PRETRAIN.") or k.startswith(f"DIRECT_PRETRAIN.{phase}."))
        and config_key_applies(k, phase)
    }


def _check_same_config(
    system: ConfigSystem, pcfg, fingerprints: dict[str, str], before_pace=None
) -> None:
    """Refuse to continue a phase folder started with a config or data that change the result.

    ``before_pace``: the phase config before the phase's last re-plan during training, which
    the folder still remembers if the run stopped between saving that re-plan and starting
    again with it (then the folder continues, with the re-plan)."""
    saved = Path(system.output_dir(pcfg)) / PHASE_KEYS_FILE
    if not saved.is_file():
        return
    phase = pcfg.DIRECT_PRETRAIN.PHASE
    saved_keys = json.loads(saved.read_text())
    saved_run = os.path.dirname(str(saved_keys.get(system.output_dir_key, "")))
    before = _result_keys(system, _portable(saved_keys, saved_run), phase)

    def result_keys(config) -> dict:
        now = _result_keys(system, _phase_keys(system, config, fingerprints), phase)
        if not any(k.startswith(DATA_PREFIX) for k in saved_keys):  # from before fingerprints
            now = {k: v for k, v in now.items() if not k.startswith(DATA_PREFIX)}
        return now

    def changed_keys(now: dict) -> list[str]:
        return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))

    now = result_keys(pcfg)
    changed = changed_keys(now)
    if not changed or (before_pace is not None and not changed_keys(result_keys(before_pace))):
        return
    data = [k.removeprefix(DATA_PREFIX) for k in changed if k.startswith(DATA_PREFIX)]
    changed = [k for k in changed if not k.startswith(DATA_PREFIX)]
    reasons = []
    if data:
        reasons.append(
            f"the data changed since: dataset(s) {', '.join(repr(d) for d in data)} (their "
            "annotation file or image list differs)"
        )
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:10])
        reasons.append(f"it was started with another config ({details})")
    raise PhaseStateError(
        f"{system.output_dir(pcfg)} holds a run of phase {phase} that this command cannot "
        f"continue: {'; '.join(reasons)}. Use a new OUTPUT_DIR, or delete that folder to "
        "restart the phase."
    )


def _phase_keys(system: ConfigSystem, pcfg, fingerprints: dict[str, str]) -> dict:
    """What a phase folder remembers: its flat config and the fingerprints of its datasets.
    Paths inside the run folder are compared relative to it (:func:`_portable`)."""
    flat = json.loads(json.dumps(system.flat(pcfg)))
    flat = _portable(flat, os.path.dirname(system.output_dir(pcfg)))
    return {**flat, **{DATA_PREFIX + name: digest for name, digest in fingerprints.items()}}


def _portable(value, run_dir: str):
    """``value`` with every path inside ``run_dir`` written as ``$OUTPUT_DIR/<relative>``, so
    that a run folder moved or copied elsewhere remembers the same config."""
    if isinstance(value, dict):
        return {k: _portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, run_dir) for v in value]
    if isinstance(value, str) and run_dir and value.startswith(run_dir.rstrip(os.sep) + os.sep):
        return RUN_DIR_VARIABLE + value[len(run_dir.rstrip(os.sep)) :]
    return value


def _forget_attempt_without_checkpoint(folder: Path, phase: str) -> None:
    """A phase folder with neither a checkpoint nor a finished state starts afresh."""
    if not folder.is_dir() or (folder / DONE_FILE).is_file():
        return
    if (folder / "last_checkpoint").is_file():
        return
    stale = [folder / PHASE_KEYS_FILE, folder / PHASE_CONFIG_FILE, *folder.glob("bridged_init*")]
    stale = [f for f in stale if f.is_file()]
    if stale:
        logger.info(
            "Phase %s: the earlier attempt in %s stopped before its first checkpoint; starting "
            "afresh.",
            phase,
            folder,
        )
        for f in stale:
            f.unlink()


def _previous_phase(system: ConfigSystem, cfg, phase: str) -> tuple[str, str]:
    """The phase before ``phase`` in PIPELINE (which must be finished) and its final model."""
    pipeline = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    index = pipeline.index(phase) if phase in pipeline else 0
    if index == 0:
        raise PhaseStateError(
            f"DIRECT_PRETRAIN.{phase}.INIT is 'previous' but no phase comes before it in "
            "DIRECT_PRETRAIN.PIPELINE; add that phase or change INIT"
        )
    previous = pipeline[index - 1]
    folder = os.path.join(system.output_dir(cfg), previous.lower())
    if read_done(folder) is None:
        raise PhaseStateError(
            f"phase {phase} starts from phase {previous}, which has not " "finished: run it first"
        )
    return previous, os.path.join(folder, FINAL_MODEL)


@contextlib.contextmanager
def _reading_final_model(phase: str, path: str) -> Iterator[None]:
    """Say how to redo the final model ``path`` of the finished ``phase`` if it is damaged."""
    try:
        yield
    except DamagedCheckpointError as e:
        done = Path(path).with_name(DONE_FILE)
        raise PhaseStateError(
            f"{e}. It is the final model of the finished phase {phase}: delete {done} and run "
            f"phase {phase} again (the whole pipeline, or DIRECT_PRETRAIN.PHASE {phase}); it "
            "resumes from its newest good checkpoint, setting the damaged file aside, and "
            "writes its final model again."
        ) from e


def _bridge_into(system: ConfigSystem, cfg, phase: Phase, pcfg, num_images: int) -> None:
    """Bridge the previous phase's final model into ``phase`` (once), at its weights.

    The target model is built on CPU here only to take the checkpoint's shapes; the trainer
    builds its own afterwards. Writing the bridged file first (atomically) is what lets a
    rerun resume without bridging again.
    """
    target_file = system.weights(pcfg)
    if comm.is_main_process() and os.path.isfile(target_file):
        logger.info("Phase %s: starts from the bridged weights %s", phase, target_file)
    elif comm.is_main_process():
        previous, source = _previous_phase(system, cfg, phase.NAME)
        logger.info(
            "Phase %s: bridging the final model of phase %s (%s) into %s",
            phase.NAME,
            previous,
            source,
            target_file,
        )
        source_phase = system.resolve(cfg, previous)
        source_cfg = system.phase_config(cfg, source_phase, num_images)
        reinit = pcfg.DIRECT_PRETRAIN.BRIDGE.REINIT_PREDICTOR_ON_CLASS_CHANGE
        with _reading_final_model(previous, source):
            bridge_checkpoint(
                source,
                system.build_model(pcfg, on_cpu=True),
                target_file,
                reinit_on_class_change=reinit,
                drop=source_phase.KIND.transfer_drop(source_cfg, pcfg),
                select=phase.INIT_KEYS,
            )
    comm.synchronize()


def _seed_phase(seed: int, name: str, step: str) -> None:
    """Seed this process's random generators from (``seed``, rank, phase ``name``, ``step``)
    before the phase's bridge or trainer is built: its random initial weights then do not
    depend on what ran before in this process (a rerun skips finished phases and a done
    bridge). A negative seed leaves them as they are."""
    if seed >= 0:
        seed_all_rng(derived_seed(seed, comm.get_rank(), zlib.crc32(f"{name}/{step}".encode())))


def _draw_batches(system: ConfigSystem, cfg, pcfg, phase: str) -> None:
    """Draw the phase's first training batch into ``report/batches_<PHASE>.jpg`` (every
    process: building the loader is collective); a failure is logged, never fatal."""
    path = os.path.join(system.output_dir(cfg), "report", f"batches_{phase}.jpg")
    try:
        draw_batches(pcfg, path)
    except Exception:  # noqa: BLE001 - the drawing is an extra; training goes on
        logger.exception("Phase %s: could not draw its first training batch.", phase)


def _phase_config(system: ConfigSystem, cfg, name: str, num_images: int) -> tuple[Phase, object]:
    """Phase ``name`` of ``cfg`` and its resolved config, starting from its bridged weights
    (INIT "previous") or its converted ones (INIT "weights")."""
    phase = system.resolve(cfg, name)
    pcfg = system.phase_config(cfg, phase, num_images)
    if phase.INIT == "previous":
        pcfg = system.with_weights(pcfg, os.path.join(system.output_dir(pcfg), BRIDGED_FILE))
    if phase.INIT == "weights":  # e.g. AlignDet converts a torchvision/MoCo backbone
        pcfg = phase.KIND.prepare_weights(pcfg)
    return phase, pcfg


def _run_phase(
    system: ConfigSystem,
    phase: Phase,
    pcfg,
    fingerprints: dict[str, str],
    num_images: int,
    share: float | None = None,
) -> dict:
    """Train (or resume) one phase over ``num_images`` training images, evaluate it and mark it
    done; return its record.

    With ``share`` (its training seconds of a budget) the phase keeps pace until its first LR
    drop: see :class:`~direct_pretrain.engine.BudgetPace`, which may raise
    :class:`~direct_pretrain.engine.PaceChanged` after a checkpoint."""
    out = Path(system.output_dir(pcfg))
    if comm.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_partial_files(out)
        if removed:
            logger.info("Removed partial files of an interrupted run: %s", removed)
        system.save(pcfg, str(out / PHASE_CONFIG_FILE))
        atomic_write_json(out / PHASE_KEYS_FILE, _phase_keys(system, pcfg, fingerprints))
    _seed_phase(system.seed(pcfg), phase.NAME, "train")
    trainer = build_trainer(pcfg)
    if share is not None:
        max_iter, drops = phase.schedule(num_images)
        until = min(drops, default=max_iter)
        pace = BudgetPace(trainer.checkpointer, trainer.timer, share, until, MIN_ITERATIONS)
        trainer.register_hooks([pace])
    trainer.resume_or_load(resume=True)
    if trainer.start_iter > 0:
        logger.info(
            "Phase %s: resuming at iteration %d of %d (%s)",
            phase.NAME,
            trainer.start_iter,
            trainer.max_iter,
            out,
        )
    else:
        logger.info(
            "Phase %s: starting, %d iterations of %d images (%s)",
            phase.NAME,
            trainer.max_iter,
            phase.IMS_PER_BATCH,
            out,
        )
    final = out / "model_final.pth"
    if trainer.start_iter >= trainer.max_iter and not comm.all_gather(final.is_file())[0]:
        # Resumed from the last iteration's checkpoint, the final one missing or set aside.
        trainer.checkpointer.save(final.stem, iteration=trainer.max_iter - 1)
    try:
        trainer.train()
    except FloatingPointError as e:
        last = trainer.checkpointer.get_checkpoint_file() or "none (from the start)"
        raise FloatingPointError(
            f"phase {phase.NAME}: training diverged at iteration {trainer.iter} ({e}). Last good "
            f"checkpoint: {last}. Rerunning resumes from it and repeats the same iterations (on "
            "CPU exactly): lower the phase's BASE_LR or raise WARMUP_ITERS and restart the "
            f"phase by deleting {out}."
        ) from e
    problem = unhealthy_weights(trainer.checkpointer.model.state_dict())
    if problem:
        raise FloatingPointError(
            f"phase {phase.NAME} ended with broken weights ({problem}); it is not recorded as "
            f"finished. Its settings: BASE_LR {phase.BASE_LR}, IMS_PER_BATCH "
            f"{phase.IMS_PER_BATCH}, WARMUP_ITERS {phase.WARMUP_ITERS}, OPTIMIZER "
            f"{phase.OPTIMIZER}. Lower DIRECT_PRETRAIN.{phase.NAME}.BASE_LR (or raise its "
            f"WARMUP_ITERS or IMS_PER_BATCH) and restart the phase by deleting {out}."
        )
    record = {
        "phase": phase.NAME,
        "iterations": trainer.max_iter,
        "ims_per_batch": phase.IMS_PER_BATCH,
        "results": trainer.eval_results,
        "eval_history": trainer.timer.history,
        "wall_seconds": round(trainer.timer.seconds, 1),
        "eval_seconds": round(trainer.timer.eval_seconds, 1),
        "cpu_seconds": round(trainer.timer.cpu_seconds, 1),
        "eval_cpu_seconds": round(trainer.timer.eval_cpu_seconds, 1),
        "final_model": FINAL_MODEL,  # in the phase folder, wherever the run folder moves
    }
    if comm.is_main_process():
        atomic_write_json(out / DONE_FILE, record)
    comm.synchronize()
    return record


def run_pipeline(cfg, user_keys: dict | None = None) -> dict:
    """Run every active phase of ``cfg`` in order; return and write ``summary.json``.

    Finished phases are skipped, an interrupted one resumes. Each phase whose INIT is
    "previous" starts from the previous phase's final model through the bridge. With a
    budget, the run is planned first (``user_keys``: see :func:`prepare_run`). The run's
    ``model_final.pth`` is the final model of the phase the validation slice chooses.
    """
    start = time.perf_counter()
    system = system_of(cfg)
    phases = [system.resolve(cfg, name) for name in active_phases(cfg)]
    check_weights_used(phases, system.weights_key, system.weights(cfg))
    cfg, num_images, val_slice = prepare_run(cfg, user_keys)
    fingerprints = dataset_fingerprints(system.dataset_names(cfg))
    summary = {"output_dir": system.output_dir(cfg), "device": None, "phases": {}}
    records, ran = {}, {}
    plan = read_plan(os.path.join(system.output_dir(cfg), PLAN_FILE)) if _budget(cfg) else None
    for name in active_phases(cfg):
        if plan is not None:
            cfg = _replan_before(system, cfg, plan, name, val_slice)
        phase, pcfg = _phase_config(system, cfg, name, num_images)
        summary["device"] = phase.DEVICE
        if comm.is_main_process():
            for adjustment in phase.ADJUSTMENTS:
                logger.info("Phase %s: %s.", name, adjustment)
            _forget_attempt_without_checkpoint(Path(system.output_dir(pcfg)), name)
        comm.synchronize()
        before_pace = _before_last_pace(system, cfg, plan, name, num_images)
        _check_same_config(system, pcfg, fingerprints, before_pace)
        record = read_done(system.output_dir(pcfg))
        if record is not None:
            logger.info(
                "Phase %s: already finished in %s (%s); skipping it.",
                name,
                system.output_dir(pcfg),
                ap_text(record),
            )
        else:
            _seed_phase(system.seed(cfg), name, "bridge")
            _draw_batches(system, cfg, pcfg, name)
            if phase.INIT == "previous":
                _bridge_into(system, cfg, phase, pcfg, num_images)
            share = phase_budget(plan, name) if plan is not None else None
            while record is None:
                try:
                    record = _run_phase(system, phase, pcfg, fingerprints, num_images, share)
                except PaceChanged as change:
                    cfg = _replan_pace(system, cfg, plan, name, change)
                    phase, pcfg = _phase_config(system, cfg, name, num_images)
        ran[name] = (phase, pcfg)
        records[name] = record
        summary["phases"][name] = {
            **phase_results(record),
            "wall_seconds": record["wall_seconds"],
            "eval_seconds": record["eval_seconds"],
            "iterations": record["iterations"],
            "ims_per_batch": record["ims_per_batch"],
        }
    choice = choose_final_phase(system, cfg, list(ran), val_slice)
    name, (phase, pcfg) = choice.phase, ran[choice.phase]
    final_model = os.path.join(system.output_dir(pcfg), FINAL_MODEL)
    summary["final_phase"], summary["val_slice"] = name, choice.val_slice
    summary["warnings"] = [
        *(r["warning"] for r in (plan or {}).get("replanned", {}).values() if r.get("warning")),
        *worse_than_earlier(summary["phases"], system.split_names(cfg)[1], name),
        *choice.warnings,
    ]
    if plan is not None:
        summary["budget"] = _budget_used(plan, summary["phases"])
    summary["final_model"] = os.path.join(system.output_dir(cfg), "model_final.pth")
    summary["pipeline_wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
    if comm.is_main_process():
        mean, std = system.pixel_stats(cfg)
        with _reading_final_model(name, final_model):
            state = load_model_state(final_model)
        atomic_torch_save(
            {"model": state, "pixel_mean": mean, "pixel_std": std}, summary["final_model"]
        )
        export_for_prediction(pcfg, system.output_dir(cfg))
        matching, summary["confusion"] = score_threshold_and_confusion(
            system, system.output_dir(cfg), phase, pcfg
        )
        atomic_write_json(os.path.join(system.output_dir(cfg), SUMMARY_FILE), summary)
        write_run_report(system, system.output_dir(cfg), phase, pcfg, summary, records, matching)
        logger.info("Box AP (%s):\n%s", summary["output_dir"], ap_table(summary))
    comm.synchronize()
    return summary


def _budget(cfg) -> float:
    return float(cfg.DIRECT_PRETRAIN.BUDGET_MINUTES)


def _replan_before(system: ConfigSystem, cfg, plan: dict, name: str, val_slice):
    """``cfg`` with phase ``name`` re-planned once the phase before it (in PIPELINE) finished:
    its length from the time that phase really took, and, with a validation slice, the
    fine-tune scale measured on it (:func:`replan_after`; ``report/box_sizes.png`` is drawn
    again at that scale). A re-plan saved in ``plan.yaml`` is
    what the phase started with: it is kept (``cfg`` holds it)."""
    pipeline = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    index = pipeline.index(name) if name in pipeline else 0
    if index == 0 or name in plan.get("replanned", {}):
        return cfg
    previous = pipeline[index - 1]
    folder = os.path.join(system.output_dir(cfg), previous.lower())
    record = read_done(folder)
    if record is None:
        return cfg
    measure = None
    if val_slice is not None:
        weights = os.path.join(folder, record["final_model"])
        measure = SliceScorer(system, cfg, previous, weights, val_slice.images)
    # loaded only if measured, once (the measurement and the figure read it)
    train_dicts = functools.cache(functools.partial(system.train_dicts, cfg))
    replanned = replan_after(system, cfg, plan, previous, record, measure, train_dicts)
    replanned = comm.all_gather(replanned)[0]  # timed in each process: the main one's
    if replanned is None:
        return cfg
    plan.setdefault("replanned", {})[name] = replanned
    if comm.is_main_process():
        write_plan(os.path.join(system.output_dir(cfg), PLAN_FILE), plan)
        logger.info("Plan: %s: %s", replanned["reason"], replanned["values"])
        if replanned.get("warning"):
            logger.warning("Plan: %s.", replanned["warning"])
    cfg = apply_plan(system, cfg, plan)
    if "scale" in replanned and comm.is_main_process():  # measured: the figure shows it
        describe_anchors(system, cfg, train_dicts(), system.output_dir(cfg), _warned_keys(plan))
    return cfg


def _replan_pace(system: ConfigSystem, cfg, plan: dict, name: str, change: PaceChanged):
    """``cfg`` with phase ``name`` re-planned during its training (:func:`replan_pace`), saved
    in ``plan.yaml`` before the phase resumes with it."""
    entry = replan_pace(plan, name, change)  # from the main process's figures, on every process
    plan.setdefault("paced", {}).setdefault(name, []).append(entry)
    if comm.is_main_process():
        write_plan(os.path.join(system.output_dir(cfg), PLAN_FILE), plan)
        logger.warning("Plan: %s: %s; resuming with it.", entry["reason"], entry["values"])
    comm.synchronize()
    return apply_plan(system, cfg, plan)


def _before_last_pace(system: ConfigSystem, cfg, plan: dict | None, name: str, num_images: int):
    """Phase ``name``'s config before its last re-plan during training (None if it has none)."""
    changes = (plan or {}).get("paced", {}).get(name, [])
    if not changes:
        return None
    before = apply_plan(system, cfg, plan, len(changes) - 1)
    return _phase_config(system, before, name, num_images)[1]


def _budget_used(plan: dict, phases: dict) -> dict:
    """The budget against the training time each phase used (evaluation apart)."""
    planned = budget_seconds(plan)
    used = {
        name: round(p["wall_seconds"] - p["eval_seconds"], 1)
        for name, p in phases.items()
        if name in planned
    }
    budget = {
        "minutes": plan["inputs"]["budget_minutes"],
        "planned_seconds": planned,
        "used_seconds": used,
        "eval_seconds": {n: phases[n]["eval_seconds"] for n in used},
        "planning_seconds": round(
            plan.get("planning_seconds", 0.0)
            + sum(r.get("planning_seconds", 0.0) for r in plan.get("replanned", {}).values()),
            1,
        ),
        "measured": {
            name: {k: r["measured"][k] for k in ("value", "rule", "figure")}
            for name, r in plan.get("replanned", {}).items()
            if "measured" in r
        },
        "paced": {
            name: [change["reason"] for change in changes]
            for name, changes in plan.get("paced", {}).items()
        },
    }
    logger.info(
        "Budget %.1f min of training: used %s (evaluation apart: %s; planning apart: %.0f s)",
        budget["minutes"],
        ", ".join(f"{n} {used[n] / 60:.1f} of {planned[n] / 60:.1f} min" for n in used),
        ", ".join(f"{n} {budget['eval_seconds'][n]:.0f} s" for n in used),
        budget["planning_seconds"],
    )
    return budget


def _describe(system: ConfigSystem, cfg, dicts: list[dict], plan: dict | None = None) -> None:
    """The training set against each phase's sizes and the anchors (``fingerprint.json``,
    ``report/box_sizes.png``), logged (a warning the ``plan`` gave is not repeated)."""
    train_names = system.split_names(cfg)[0]
    phases = [system.resolve(cfg, name) for name in active_phases(cfg)]
    classes = MetadataCatalog.get(train_names[0]).get("thing_classes", None)
    fingerprint = os.path.join(system.output_dir(cfg), FINGERPRINT_FILE)
    describe_data(dicts, phases, classes, fingerprint)
    describe_anchors(system, cfg, dicts, system.output_dir(cfg), _warned_keys(plan))


def _warned_keys(plan: dict | None) -> list[str]:
    """The keys the plan warned about (their warning is not repeated)."""
    return [c["key"] for c in (plan or {}).get("choices", []) if c.get("warning")]


def prepare_run(cfg, user_keys: dict | None = None):
    """Everything before the first phase: :func:`prepare_config`, ``config.yaml``, the
    validation slice held out of training, and with ``DIRECT_PRETRAIN.BUDGET_MINUTES`` the
    plan (made on the training set without the slice, the main process's kept).

    Args:
        cfg: the pipeline config.
        user_keys: ``{key: where}`` of the keys the user set, which a plan keeps
            (:func:`direct_pretrain.config_systems.user_set_keys`); by default the
            ``DIRECT_PRETRAIN`` keys that differ from their defaults.

    Returns:
        The config to run, its number of training images and the validation slice.
    """
    system = system_of(cfg)
    cfg, num_images = prepare_config(cfg)
    if comm.is_main_process():
        system.save_pipeline(cfg, os.path.join(system.output_dir(cfg), PIPELINE_CONFIG_FILE))
    cfg, num_images, val_slice = hold_out_val_slice(system, cfg, num_images)
    if _budget(cfg):
        user = default_user_keys(cfg) if user_keys is None else user_keys
        dicts = system.train_dicts(cfg)
        digests = dataset_fingerprints(system.split_names(cfg)[0])
        cfg, plan = planned_config(system, cfg, dicts, user, digests)  # on every process
        if comm.is_main_process():
            _describe(system, cfg, dicts, plan)
    return cfg, num_images, val_slice


def plan_run(cfg, user_keys: dict | None = None) -> dict | None:
    """``train_net.py --plan-only``: fingerprint the data, make (or reuse) and log the plan,
    write ``OUTPUT_DIR/plan.yaml``; train nothing. Returns the plan (None without a budget)."""
    prepare_run(cfg, user_keys)
    if not _budget(cfg):
        logger.warning(
            "DIRECT_PRETRAIN.BUDGET_MINUTES is 0: nothing is planned (the data view above is "
            "what the config's own sizes give). Set a budget in minutes to plan the run."
        )
        return None
    return read_plan(os.path.join(system_of(cfg).output_dir(cfg), PLAN_FILE))


def evaluate_weights(cfg, weights: str) -> dict:
    """Evaluate ``weights`` with the last active phase's test settings (``--eval-only``).

    Needs only the test sets: dataset pixel statistics come from the weights file (a run's
    ``model_final.pth``) or the ``phase_config.yaml`` beside it.
    """
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights '{weights}' not found")
    system = system_of(cfg)
    cfg, num_images = prepare_config(cfg, eval_only=True)
    if cfg.DIRECT_PRETRAIN.PIXEL_STATS == "dataset":
        saved = saved_pixel_stats(weights)
        if saved is None:
            logger.info(
                "%s carries no pixel statistics: computing them from the training set, as the "
                "run did.",
                weights,
            )
            cfg, num_images = prepare_config(cfg)
        else:
            logger.info("Pixel statistics saved with %s: mean %s, std %s", weights, *saved)
            cfg = system.with_pixel_stats(cfg, *saved)
    pcfg = system.phase_config(cfg, system.resolve(cfg, active_phases(cfg)[-1]), num_images)
    model = system.build_model(pcfg)
    load_weights_strictly(model, weights)
    return evaluate(pcfg, model)
