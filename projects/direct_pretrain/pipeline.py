"""The pipeline: pre-train -> bridge -> fine-tune -> evaluate, one folder per phase.

A phase is finished when its folder holds ``phase_done.json`` (written atomically after its
final evaluation); a rerun skips finished phases and resumes an interrupted one from its last
complete checkpoint. A phase folder remembers the config it was started with, and a rerun
with a config that would change its result is refused, naming the keys.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import yaml
from detectron2.config import CfgNode
from detectron2.utils import comm

from .bridge import bridge_checkpoint, load_model_state
from .checkpoint import SafeCheckpointer
from .data.datasets import cache_dir, register_datasets
from .data.pixel_stats import dataset_pixel_stats
from .phases import active_phases, phase_config, phase_node
from .trainer import DirectPretrainTrainer, training_dicts
from .utils.env import check_cpp_requirements
from .utils.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    remove_partial_files,
)

__all__ = ["prepare_config", "run_pipeline", "evaluate_weights", "PhaseStateError"]

logger = logging.getLogger(__name__)

DONE_FILE = "phase_done.json"
PHASE_CONFIG_FILE = "phase_config.yaml"
BRIDGED_FILE = "bridged_init.pth"
SUMMARY_FILE = "summary.json"
# Keys that may change between a run and its resume without changing the result.
RESUME_SAFE_KEYS = ("DATALOADER.NUM_WORKERS", "MODEL.DEVICE", "SOLVER.CHECKPOINT_PERIOD",
                    "TEST.EVAL_PERIOD", "SOLVER.AMP.ENABLED", "OUTPUT_DIR")


class PhaseStateError(RuntimeError):
    """A phase folder holds a run that this config cannot continue."""


def prepare_config(cfg: CfgNode) -> tuple[CfgNode, int]:
    """Register datasets and check the config; return it with pixel statistics resolved.

    Returns:
        The (frozen) config, with ``MODEL.PIXEL_MEAN/STD`` computed from the training set if
        ``DIRECT_PRETRAIN.PIXEL_STATS`` is "dataset", and the number of training images.
    """
    check_cpp_requirements(cfg)
    if comm.is_main_process():  # build cached datasets once before the other processes
        ensure_writable_dir(cfg.OUTPUT_DIR)
        register_datasets(cfg)
    comm.synchronize()
    register_datasets(cfg)
    dicts = training_dicts(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    node = cfg.DIRECT_PRETRAIN
    if node.PIXEL_STATS not in ("config", "dataset"):
        raise ValueError(f"DIRECT_PRETRAIN.PIXEL_STATS = '{node.PIXEL_STATS}' is not "
                         "'config' or 'dataset'")
    if node.PIXEL_STATS == "dataset":
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = dataset_pixel_stats(
            [d["file_name"] for d in dicts], cfg.INPUT.FORMAT, node.PIXEL_STATS_MAX_IMAGES,
            cache_dir(cfg),
        )
    cfg.freeze()
    return cfg, len(dicts)


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _result_keys(cfg: CfgNode) -> dict:
    """The config keys that determine a phase's result (other phases' nodes left out)."""
    flat = _flat(yaml.safe_load(cfg.dump()))
    phase = cfg.DIRECT_PRETRAIN.PHASE
    return {
        k: v for k, v in flat.items()
        if k not in RESUME_SAFE_KEYS
        and (not k.startswith("DIRECT_PRETRAIN.") or k.startswith(f"DIRECT_PRETRAIN.{phase}."))
    }


def _check_same_config(pcfg: CfgNode) -> None:
    """Refuse to continue a phase folder started with a config that changes the result."""
    saved = Path(pcfg.OUTPUT_DIR) / PHASE_CONFIG_FILE
    if not saved.is_file():
        return
    before = _result_keys(CfgNode(yaml.safe_load(saved.read_text())))
    now = _result_keys(pcfg)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:10])
        raise PhaseStateError(
            f"{pcfg.OUTPUT_DIR} holds a run started with another config ({details}). "
            "Use a new OUTPUT_DIR, or delete that folder to restart the phase."
        )


def _read_done(pcfg: CfgNode) -> dict | None:
    path = Path(pcfg.OUTPUT_DIR) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _previous_final_model(cfg: CfgNode, phase: str) -> str:
    """Final model of the phase before ``phase`` in PIPELINE, which must be finished."""
    pipeline = list(cfg.DIRECT_PRETRAIN.PIPELINE)
    index = pipeline.index(phase) if phase in pipeline else 0
    if index == 0:
        raise PhaseStateError(
            f"DIRECT_PRETRAIN.{phase}.INIT is 'previous' but no phase comes before it in "
            "DIRECT_PRETRAIN.PIPELINE; add that phase or change INIT"
        )
    previous = pipeline[index - 1]
    done = Path(cfg.OUTPUT_DIR) / previous.lower() / DONE_FILE
    if not done.is_file():
        raise PhaseStateError(f"phase {phase} starts from phase {previous}, which has not "
                              f"finished ({done} is missing): run it first")
    return json.loads(done.read_text())["final_model"]


def _bridge_into(pcfg: CfgNode, source: str) -> None:
    """Bridge ``source`` into the model of phase ``pcfg`` (once) at its MODEL.WEIGHTS."""
    if comm.is_main_process() and not os.path.isfile(pcfg.MODEL.WEIGHTS):
        target = DirectPretrainTrainer.build_model(_on_cpu(pcfg))
        bridge_checkpoint(
            source, target, pcfg.MODEL.WEIGHTS,
            reinit_on_class_change=pcfg.DIRECT_PRETRAIN.BRIDGE.REINIT_PREDICTOR_ON_CLASS_CHANGE,
        )
    comm.synchronize()


def _on_cpu(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _with_weights(pcfg: CfgNode, weights: str) -> CfgNode:
    pcfg = pcfg.clone()
    pcfg.defrost()
    pcfg.MODEL.WEIGHTS = weights
    pcfg.freeze()
    return pcfg


def _run_phase(pcfg: CfgNode) -> dict:
    """Train (or resume) one phase, evaluate it and mark it done; return its record."""
    out = Path(pcfg.OUTPUT_DIR)
    if comm.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_partial_files(out)
        if removed:
            logger.info("Removed partial files of an interrupted run: %s", removed)
        atomic_write_text(out / PHASE_CONFIG_FILE, pcfg.dump())
    trainer = DirectPretrainTrainer(pcfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter > 0:
        logger.info("Phase %s: resuming at iteration %d of %d", pcfg.DIRECT_PRETRAIN.PHASE,
                    trainer.start_iter, trainer.max_iter)
    try:
        trainer.train()
    except FloatingPointError as e:
        last = trainer.checkpointer.get_checkpoint_file() or "none (from the start)"
        raise FloatingPointError(
            f"phase {pcfg.DIRECT_PRETRAIN.PHASE}: training diverged at iteration "
            f"{trainer.iter} ({e}). Last good checkpoint: {last}. Rerunning resumes from it "
            "(the data order differs after a resume); if it diverges again, lower the phase's "
            f"BASE_LR or raise WARMUP_ITERS and restart the phase by deleting {pcfg.OUTPUT_DIR}."
        ) from e
    record = {
        "phase": pcfg.DIRECT_PRETRAIN.PHASE,
        "iterations": trainer.max_iter,
        "ims_per_batch": pcfg.SOLVER.IMS_PER_BATCH,
        "results": trainer.eval_results,
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


def run_pipeline(cfg: CfgNode) -> dict:
    """Run every active phase of ``cfg`` in order; return and write ``summary.json``.

    Finished phases are skipped, an interrupted one resumes. Each phase whose INIT is
    "previous" starts from the previous phase's final model through the bridge.
    """
    start = time.perf_counter()
    cfg, num_images = prepare_config(cfg)
    summary = {"output_dir": cfg.OUTPUT_DIR, "device": None, "phases": {}}
    for phase in active_phases(cfg):
        pcfg = phase_config(cfg, phase, num_images)
        summary["device"] = pcfg.MODEL.DEVICE
        from_previous = phase_node(pcfg).INIT == "previous"
        if from_previous:
            pcfg = _with_weights(pcfg, os.path.join(pcfg.OUTPUT_DIR, BRIDGED_FILE))
        _check_same_config(pcfg)
        record = _read_done(pcfg)
        if record is not None:
            logger.info("Phase %s already finished (%s); skipping it.", phase, pcfg.OUTPUT_DIR)
        else:
            if from_previous:
                _bridge_into(pcfg, _previous_final_model(cfg, phase))
            logger.info("Phase %s: %d iterations of %d images, output %s", phase,
                        pcfg.SOLVER.MAX_ITER, pcfg.SOLVER.IMS_PER_BATCH, pcfg.OUTPUT_DIR)
            record = _run_phase(pcfg)
        final_model = record["final_model"]
        summary["phases"][phase] = {**_bbox(record), "wall_seconds": record["wall_seconds"],
                                    "eval_seconds": record["eval_seconds"],
                                    "iterations": record["iterations"],
                                    "ims_per_batch": record["ims_per_batch"]}
    summary["final_model"] = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    summary["pipeline_wall_seconds_this_run"] = round(time.perf_counter() - start, 1)
    if comm.is_main_process():
        atomic_torch_save({"model": load_model_state(final_model)}, summary["final_model"])
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, SUMMARY_FILE), summary)
    return summary


def evaluate_weights(cfg: CfgNode, weights: str) -> dict:
    """Evaluate ``weights`` with the last active phase's test settings (``--eval-only``)."""
    cfg, num_images = prepare_config(cfg)
    phase = active_phases(cfg)[-1]
    pcfg = phase_config(cfg, phase, num_images)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS '{weights}' not found")
    model = DirectPretrainTrainer.build_model(pcfg)
    SafeCheckpointer(model).load(weights)
    return DirectPretrainTrainer.test(pcfg, model)
