"""The run folder: its file names, what they hold, and what a finished run leaves for prediction.

A run folder (``OUTPUT_DIR``) holds ``config.yaml`` (the pipeline config, written when a run
starts), one folder per phase (``<phase>/phase_done.json`` once the phase has finished, its
``phase_config.yaml`` and ``phase_keys.json``), ``model_final.pth``, ``summary.json`` (both
written when a run ends), and for prediction ``config_predict.yaml`` (a plain Detectron2
config of the final model), ``classes.json`` (class names and dataset category ids) and
``predict_threshold.json`` (the final model's F1-best score threshold on the test set), so that
prediction needs neither the training set nor a registered dataset. With a validation slice
(``DIRECT_PRETRAIN.VAL_SLICE``), ``val_slice_coco.json`` lists its images and boxes, and each
detector phase folder holds its final model's evaluation on it (``val_slice_eval.json``,
``val_slice/``); ``model_final.pth`` is then the final model of the phase ``summary.json`` names
in ``final_phase``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.data import MetadataCatalog

from .config_systems import system_of
from .utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "BRIDGED_FILE",
    "CLASSES_FILE",
    "DETECTIONS_FILE",
    "DONE_FILE",
    "FINAL_MODEL",
    "FINGERPRINT_FILE",
    "PHASE_CONFIG_FILE",
    "PHASE_KEYS_FILE",
    "PHASE_SAFE_KEYS",
    "PIPELINE_CONFIG_FILE",
    "PREDICT_CONFIG_FILE",
    "PREDICT_THRESHOLD_FILE",
    "SUMMARY_FILE",
    "VAL_SLICE_DIR",
    "VAL_SLICE_EVAL_FILE",
    "VAL_SLICE_JSON",
    "ClassInfo",
    "class_info",
    "ended_phase",
    "export_for_prediction",
    "final_model_phase",
    "last_checkpoint_text",
    "last_phase_config",
    "read_done",
    "read_predict_threshold",
    "run_last_phase",
    "save_predict_threshold",
    "saved_pixel_stats",
]

# Phase keys that may change between a run and its resume (speed and bookkeeping only).
PHASE_SAFE_KEYS = ("CHECKPOINT_PERIOD", "EVAL_PERIOD", "RESIZED_CACHE", "AMP")

logger = logging.getLogger(__name__)

# In a phase folder: the record of a finished phase, the config it ran with, the flat config
# and data fingerprints it remembers, and the bridged initial weights.
DONE_FILE = "phase_done.json"
PHASE_CONFIG_FILE = "phase_config.yaml"
PHASE_KEYS_FILE = "phase_keys.json"
BRIDGED_FILE = "bridged_init.pth"
# In the run folder.
PIPELINE_CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
FINGERPRINT_FILE = "fingerprint.json"  # the training set's sizes, as each phase sees them
FINAL_MODEL = "model_final.pth"
PREDICT_CONFIG_FILE = "config_predict.yaml"
CLASSES_FILE = "classes.json"
PREDICT_THRESHOLD_FILE = "predict_threshold.json"
VAL_SLICE_JSON = "val_slice_coco.json"  # the validation slice's images and boxes (COCO)
# In a detector phase folder: its final model's results on the validation slice, and the
# folder of that evaluation (its inference/).
VAL_SLICE_EVAL_FILE = "val_slice_eval.json"
VAL_SLICE_DIR = "val_slice"
# In a phase folder's inference/: the detections of its last evaluation (Detectron2's name).
DETECTIONS_FILE = "coco_instances_results.json"
# Project keys a model needs at inference, by what selects them (others are training-only).
_MODEL_NODES = {
    "FCOS": lambda cfg: cfg.MODEL.META_ARCHITECTURE == "FCOSDetector",
    "SWIN": lambda cfg: cfg.MODEL.BACKBONE.NAME == "build_swin_fpn_backbone",
}


def read_done(folder: str | os.PathLike) -> dict | None:
    """The record of a finished phase in its ``folder``, or None if it has not finished."""
    path = Path(folder) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class ClassInfo:
    """Class names and dataset category ids, indexed by the model's class index."""

    names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()

    def name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else str(index)

    def category_id(self, index: int) -> int:
        return self.category_ids[index] if index < len(self.category_ids) else index


def _plain_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` without the keys Detectron2's own ``get_cfg()`` lacks, except the project
    model nodes the model uses (FCOS, Swin)."""

    def prune(node: CfgNode, reference: CfgNode) -> None:
        for key in list(node.keys()):
            if key not in reference:
                del node[key]
            elif isinstance(node[key], CfgNode) and isinstance(reference[key], CfgNode):
                prune(node[key], reference[key])

    out = cfg.clone()
    out.defrost()
    kept = {k: out.MODEL[k] for k, used in _MODEL_NODES.items() if k in out.MODEL and used(out)}
    prune(out, d2_get_cfg())
    for key, node in kept.items():
        out.MODEL[key] = node
    return out


def export_for_prediction(pcfg, output_dir: str) -> None:
    """Write ``config_predict.yaml`` (yacs runs) and ``classes.json`` into the run folder.

    Args:
        pcfg: the resolved config of the phase whose final model is
            ``output_dir/model_final.pth`` (nothing is written for a phase whose model is not
            a detector, e.g. AlignDet's BOX_DOMAIN).
        output_dir: the run folder.
    """
    system = system_of(pcfg)
    if not system.phase(pcfg).KIND.evaluates:
        return
    if isinstance(pcfg, CfgNode):
        plain = _plain_config(pcfg)
        plain.MODEL.WEIGHTS = os.path.abspath(os.path.join(output_dir, FINAL_MODEL))
        plain.OUTPUT_DIR = os.path.abspath(output_dir)
        atomic_write_text(os.path.join(output_dir, PREDICT_CONFIG_FILE), plain.dump())
    dataset_name = system.split_names(pcfg)[0][0]
    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("thing_classes", None)
    if names is None:
        logger.warning(
            "Dataset '%s' has no thing_classes: predictions will name classes by index.",
            dataset_name,
        )
        return
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
    ids = {v: int(k) for k, v in to_contiguous.items()}
    atomic_write_json(
        os.path.join(output_dir, CLASSES_FILE),
        {
            "dataset": dataset_name,
            "thing_classes": list(names),
            "category_ids": [ids.get(i, i) for i in range(len(names))],
        },
    )


def save_predict_threshold(output_dir: str, threshold: dict | None) -> None:
    """Write ``predict_threshold.json`` into the run folder: the score threshold ``predict.py
    --run`` uses by default (``{"score_threshold", "f1", "iou", "dataset", "phase"}``: the
    phase whose final model it belongs to); with None remove it (the final model has none)."""
    path = Path(output_dir) / PREDICT_THRESHOLD_FILE
    if threshold is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_json(path, threshold)


def read_predict_threshold(run: Path) -> dict | None:
    """The run's saved score threshold (:func:`save_predict_threshold`), or None."""
    path = run / PREDICT_THRESHOLD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def last_phase_config(run: Path) -> Path:
    """The saved config of the phase that produced ``run/model_final.pth``."""
    summary = run / SUMMARY_FILE
    if not summary.is_file():
        raise FileNotFoundError(
            f"{summary} not found: '{run}' is not a finished run of train_net.py"
        )
    phase = final_model_phase(run)
    if phase is None:
        raise ValueError(f"{summary} lists no phase")
    return run / phase.lower() / PHASE_CONFIG_FILE


def _summary(run: Path) -> dict:
    summary = run / SUMMARY_FILE
    return json.loads(summary.read_text()) if summary.is_file() else {}


def ended_phase(run: Path) -> str | None:
    """The last phase of the run that wrote ``run/model_final.pth``: the last one
    ``summary.json`` (written after it) lists; None without a summary."""
    phases = list(_summary(run).get("phases", {}))
    return phases[-1] if phases else None


def final_model_phase(run: Path) -> str | None:
    """The phase whose final model ``run/model_final.pth`` is: ``summary.json``'s
    ``final_phase`` (chosen on the validation slice), else the last phase it lists; None
    without a summary."""
    return _summary(run).get("final_phase") or ended_phase(run)


class _TolerantLoader(yaml.SafeLoader):
    """A safe YAML loader that reads python-tagged values (saved LazyConfigs) as None."""


_TolerantLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _pipeline_node(config: Path) -> dict:
    """The ``DIRECT_PRETRAIN`` node of a saved pipeline config; empty if it cannot be read."""
    try:
        tree = yaml.load(config.read_text(), _TolerantLoader)
    except (OSError, yaml.YAMLError):
        return {}
    node = tree.get("DIRECT_PRETRAIN") if isinstance(tree, dict) else None
    return node if isinstance(node, dict) else {}


def run_last_phase(run: Path) -> str | None:
    """The last phase of the latest run in the folder ``run``.

    From its ``config.yaml`` (``DIRECT_PRETRAIN.PHASE`` if set, else the last of
    ``DIRECT_PRETRAIN.PIPELINE``); where that file does not say, a phase folder with a
    checkpoint newer than ``model_final.pth`` and no ``phase_done.json`` (an unfinished later
    attempt), else the last phase of the run that wrote ``model_final.pth``.
    """
    node = _pipeline_node(run / PIPELINE_CONFIG_FILE)
    if node.get("PHASE") or node.get("PIPELINE"):
        return node.get("PHASE") or node["PIPELINE"][-1]
    final = run / FINAL_MODEL
    built = final.stat().st_mtime if final.is_file() else 0.0
    for checkpoint in sorted(run.glob("*/last_checkpoint")):
        if read_done(checkpoint.parent) is None and checkpoint.stat().st_mtime > built:
            return checkpoint.parent.name.upper()
    return ended_phase(run)


def last_checkpoint_text(folder: Path) -> str:
    """What the phase ``folder`` holds of an unfinished phase, for a message."""
    checkpoint = folder / "last_checkpoint"
    if not checkpoint.is_file():
        return f"{folder} holds no checkpoint"
    name = checkpoint.read_text().strip()
    number = name.removeprefix("model_").removesuffix(".pth")
    if number.isdigit():  # Detectron2 names a checkpoint by its last iteration, from 0
        return f"{folder} holds checkpoints up to iteration {int(number) + 1} ({name})"
    return f"{folder} holds its checkpoint {name}"


def saved_pixel_stats(weights: str) -> tuple[list[float], list[float]] | None:
    """Pixel mean and std saved with a run's final model, or in the ``phase_config.yaml``
    beside a phase's checkpoint; None if neither has them."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=True) if weights else None
    if isinstance(ckpt, dict) and "pixel_mean" in ckpt:
        return list(ckpt["pixel_mean"]), list(ckpt["pixel_std"])
    phase_file = Path(weights).parent / PHASE_CONFIG_FILE
    if phase_file.is_file():
        tree = yaml.load(phase_file.read_text(), _TolerantLoader)
        model = tree.get("MODEL") or tree.get("model") or {}
        mean = model.get("PIXEL_MEAN", model.get("pixel_mean"))
        std = model.get("PIXEL_STD", model.get("pixel_std"))
        if mean and std:
            return list(mean), list(std)
    return None


def class_info(cfg, folder: str | os.PathLike | None = None) -> ClassInfo:
    """Class names and category ids: ``folder/classes.json`` (a run folder), else the metadata
    of the config's training dataset if it is registered, else classes named by index."""
    path = Path(folder) / CLASSES_FILE if folder is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return ClassInfo(tuple(saved["thing_classes"]), tuple(saved["category_ids"]))
    name = (system_of(cfg).split_names(cfg)[0] or [""])[0]
    meta = MetadataCatalog.get(name) if name else None
    names = meta.get("thing_classes", None) if meta is not None else None
    if not names:
        logger.warning(
            "No %s in the run and no class names for dataset '%s': classes are named by "
            "their index.",
            CLASSES_FILE,
            name,
        )
        return ClassInfo()
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
    ids = {v: int(k) for k, v in to_contiguous.items()}
    return ClassInfo(tuple(names), tuple(ids.get(i, i) for i in range(len(names))))
