"""The pipeline: pre-train -> bridge -> fine-tune -> evaluate, one folder per phase.

A phase is finished when its folder holds ``phase_done.json`` (written atomically after its
final evaluation); a rerun skips finished phases and resumes an interrupted one from its last
complete checkpoint. A phase folder remembers the config it was started with, and a rerun
with a config that would change its result is refused, naming the keys. Works the same for
yacs and LazyConfig configs (:mod:`.kinds`) and with any number of processes (only the main
process writes files; the others wait for it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from detectron2.utils import comm

from .aligndet import transfer_drop
from .bridge import bridge_checkpoint, load_model_state
from .data.datasets import cache_dir, register_named_datasets
from .data.pixel_stats import dataset_pixel_stats
from .evaluation import load_weights_strictly, predictor
from .kinds import ConfigKind, kind_of
from .phases import active_phases, phase_node
from .report import write_report
from .utils.io import (
    atomic_torch_save,
    atomic_write_json,
    ensure_writable_dir,
    remove_partial_files,
)

__all__ = ["prepare_config", "run_pipeline", "evaluate_weights", "PhaseStateError"]

logger = logging.getLogger(__name__)

DONE_FILE = "phase_done.json"
PHASE_CONFIG_FILE = "phase_config.yaml"
PHASE_KEYS_FILE = "phase_keys.json"
BRIDGED_FILE = "bridged_init.pth"
SUMMARY_FILE = "summary.json"
# Phase keys that may change between a run and its resume (speed and bookkeeping only).
PHASE_SAFE_KEYS = ("CHECKPOINT_PERIOD", "EVAL_PERIOD", "RESIZED_CACHE", "AMP")


class PhaseStateError(RuntimeError):
    """A phase folder holds a run that this config cannot continue."""


def prepare_config(cfg):
    """Register datasets and check the config; return it with pixel statistics resolved.

    Returns:
        The config, with the model's pixel mean/std computed from the training set if
        ``DIRECT_PRETRAIN.PIXEL_STATS`` is "dataset", and the number of training images.
    """
    kind = kind_of(cfg)
    kind.check(cfg)
    node = cfg.DIRECT_PRETRAIN
    if node.PIXEL_STATS not in ("config", "dataset"):
        raise ValueError(
            f"DIRECT_PRETRAIN.PIXEL_STATS = '{node.PIXEL_STATS}' is not " "'config' or 'dataset'"
        )
    names = kind.dataset_names(cfg)
    if comm.is_main_process():  # build cached datasets once before the other processes
        ensure_writable_dir(kind.output_dir(cfg))
        register_named_datasets(node, names)
    comm.synchronize()
    register_named_datasets(node, names)
    dicts = kind.train_dicts(cfg)
    if node.PIXEL_STATS == "dataset":
        mean, std = dataset_pixel_stats(
            [d["file_name"] for d in dicts],
            kind.image_format(cfg),
            node.PIXEL_STATS_MAX_IMAGES,
            cache_dir(node),
        )
        cfg = kind.with_pixel_stats(cfg, mean, std)
    return cfg, len(dicts)


def _result_keys(kind: ConfigKind, flat: dict, phase: str) -> dict:
    """The config keys that determine a phase's result (other phases' nodes left out)."""
    safe = {*kind.resume_safe_keys, *(f"DIRECT_PRETRAIN.{phase}.{k}" for k in PHASE_SAFE_KEYS)}
    return {
        k: v
        for k, v in flat.items()
        if k not in safe
        and (not k.startswith("DIRECT_PRETRAIN.") or k.startswith(f"DIRECT_PRETRAIN.{phase}."))
        and (not k.startswith("ALIGNDET.") or phase == "BOX_DOMAIN")
    }


def _check_same_config(kind: ConfigKind, pcfg) -> None:
    """Refuse to continue a phase folder started with a config that changes the result."""
    saved = Path(kind.output_dir(pcfg)) / PHASE_KEYS_FILE
    if not saved.is_file():
        return
    phase = pcfg.DIRECT_PRETRAIN.PHASE
    before = _result_keys(kind, json.loads(saved.read_text()), phase)
    now = _result_keys(kind, json.loads(json.dumps(kind.flat(pcfg))), phase)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:10])
        raise PhaseStateError(
            f"{kind.output_dir(pcfg)} holds a run started with another config ({details}). "
            "Use a new output folder, or delete that folder to restart the phase."
        )


def _read_done(folder: str) -> dict | None:
    path = Path(folder) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _previous_phase(kind: ConfigKind, cfg, phase: str) -> tuple[str, str]:
    """The phase before ``phase`` in PIPELINE (which must be finished) and its final model."""
    pipeline = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    index = pipeline.index(phase) if phase in pipeline else 0
    if index == 0:
        raise PhaseStateError(
            f"DIRECT_PRETRAIN.{phase}.INIT is 'previous' but no phase comes before it in "
            "DIRECT_PRETRAIN.PIPELINE; add that phase or change INIT"
        )
    previous = pipeline[index - 1]
    done = _read_done(os.path.join(kind.output_dir(cfg), previous.lower()))
    if done is None:
        raise PhaseStateError(
            f"phase {phase} starts from phase {previous}, which has not " "finished: run it first"
        )
    return previous, done["final_model"]


def _bridge_into(kind: ConfigKind, cfg, pcfg) -> None:
    """Bridge the previous phase's final model into phase ``pcfg`` (once), at its weights."""
    target_file = kind.weights(pcfg)
    if comm.is_main_process() and not os.path.isfile(target_file):
        phase = pcfg.DIRECT_PRETRAIN.PHASE
        previous, source = _previous_phase(kind, cfg, phase)
        bridge_checkpoint(
            source,
            kind.build_model(pcfg, on_cpu=True),
            target_file,
            reinit_on_class_change=pcfg.DIRECT_PRETRAIN.BRIDGE.REINIT_PREDICTOR_ON_CLASS_CHANGE,
            drop=transfer_drop(pcfg) if previous == "BOX_DOMAIN" else (),
            select=phase_node(pcfg).INIT_KEYS,
        )
    comm.synchronize()


def _run_phase(kind: ConfigKind, pcfg) -> dict:
    """Train (or resume) one phase, evaluate it and mark it done; return its record."""
    phase = pcfg.DIRECT_PRETRAIN.PHASE
    out = Path(kind.output_dir(pcfg))
    if comm.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_partial_files(out)
        if removed:
            logger.info("Removed partial files of an interrupted run: %s", removed)
        kind.save(pcfg, str(out / PHASE_CONFIG_FILE))
        atomic_write_json(out / PHASE_KEYS_FILE, kind.flat(pcfg))
    trainer = kind.trainer(pcfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter > 0:
        logger.info(
            "Phase %s: resuming at iteration %d of %d", phase, trainer.start_iter, trainer.max_iter
        )
    try:
        trainer.train()
    except FloatingPointError as e:
        last = trainer.checkpointer.get_checkpoint_file() or "none (from the start)"
        raise FloatingPointError(
            f"phase {phase}: training diverged at iteration {trainer.iter} ({e}). Last good "
            f"checkpoint: {last}. Rerunning resumes from it (the data order differs after a "
            "resume); if it diverges again, lower the phase's BASE_LR or raise WARMUP_ITERS "
            f"and restart the phase by deleting {out}."
        ) from e
    record = {
        "phase": phase,
        "iterations": trainer.max_iter,
        "ims_per_batch": phase_node(pcfg).IMS_PER_BATCH,
        "results": trainer.eval_results,
        "eval_history": trainer.eval_history,
        "wall_seconds": round(trainer.timer.seconds, 1),
        "eval_seconds": round(trainer.eval_seconds, 1),
        "final_model": str(out / "model_final.pth"),
    }
    if comm.is_main_process():
        atomic_write_json(out / DONE_FILE, record)
    comm.synchronize()
    return record


def _bbox(record: dict) -> dict:
    bbox = record.get("results", {}).get("bbox", {})
    return {k: bbox[k] for k in ("AP", "AP50", "AP75") if k in bbox}


def run_pipeline(cfg) -> dict:
    """Run every active phase of ``cfg`` in order; return and write ``summary.json``.

    Finished phases are skipped, an interrupted one resumes. Each phase whose INIT is
    "previous" starts from the previous phase's final model through the bridge.
    """
    start = time.perf_counter()
    kind = kind_of(cfg)
    cfg, num_images = prepare_config(cfg)
    summary = {"output_dir": kind.output_dir(cfg), "device": None, "phases": {}}
    records = {}
    for phase in active_phases(cfg):
        pcfg = kind.phase_config(cfg, phase, num_images)
        summary["device"] = kind.device(pcfg)
        from_previous = phase_node(pcfg).INIT == "previous"
        if from_previous:
            pcfg = kind.with_weights(pcfg, os.path.join(kind.output_dir(pcfg), BRIDGED_FILE))
        _check_same_config(kind, pcfg)
        record = _read_done(kind.output_dir(pcfg))
        if record is not None:
            logger.info(
                "Phase %s already finished (%s); skipping it.", phase, kind.output_dir(pcfg)
            )
        else:
            if from_previous:
                _bridge_into(kind, cfg, pcfg)
            logger.info("Phase %s: output %s", phase, kind.output_dir(pcfg))
            record = _run_phase(kind, pcfg)
        final_model = record["final_model"]
        records[phase] = record
        summary["phases"][phase] = {
            **_bbox(record),
            "wall_seconds": record["wall_seconds"],
            "eval_seconds": record["eval_seconds"],
            "iterations": record["iterations"],
            "ims_per_batch": record["ims_per_batch"],
        }
    summary["final_model"] = os.path.join(kind.output_dir(cfg), "model_final.pth")
    summary["pipeline_wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
    if comm.is_main_process():
        atomic_torch_save({"model": load_model_state(final_model)}, summary["final_model"])
        atomic_write_json(os.path.join(kind.output_dir(cfg), SUMMARY_FILE), summary)
        _report(kind, kind.output_dir(cfg), pcfg, summary, records)
    comm.synchronize()
    return summary


def _report(kind: ConfigKind, output_dir: str, pcfg, summary: dict, records: dict) -> None:
    """Write the run's report; a failure is logged, never fatal (the results are saved)."""
    try:
        predict = None
        if pcfg.DIRECT_PRETRAIN.PHASE != "BOX_DOMAIN":  # a detector, not a box-domain model
            predict = predictor(kind, pcfg, summary["final_model"])
        write_report(
            output_dir,
            summary,
            records,
            predict,
            kind.dataset_names(pcfg)[-1],
            kind.image_format(pcfg),
        )
    except Exception:  # noqa: BLE001 - the report is an extra; training results are saved
        logger.exception("Could not write the report; the results above are saved.")


def evaluate_weights(cfg, weights: str) -> dict:
    """Evaluate ``weights`` with the last active phase's test settings (``--eval-only``)."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights '{weights}' not found")
    kind = kind_of(cfg)
    cfg, num_images = prepare_config(cfg)
    pcfg = kind.phase_config(cfg, active_phases(cfg)[-1], num_images)
    model = kind.build_model(pcfg)
    load_weights_strictly(model, weights)
    return kind.evaluate(pcfg, model)
