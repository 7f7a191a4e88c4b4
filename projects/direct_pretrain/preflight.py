"""Checks run before anything trains: settings that would be ignored or fail late, and the
fingerprint of the data a phase was trained and evaluated on."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .data.fingerprint import PERCENTILES, box_sides, dataset_fingerprint
from .data.validate import REGISTER_KEYS
from .phase_kinds import PhaseConfigError
from .phases import Phase
from .utils.io import atomic_write_json

__all__ = [
    "check_num_classes",
    "check_weights_used",
    "describe_data",
    "dataset_fingerprints",
    "warn_left_out_images",
    "warn_unused_datasets",
]

logger = logging.getLogger(__name__)


def _classes(name: str) -> list[str]:
    meta = MetadataCatalog.get(name)
    if not meta.get("thing_classes", None):
        DatasetCatalog.get(name)  # a COCO dataset sets its classes when it is loaded
    return list(meta.get("thing_classes", None) or [])


def check_num_classes(
    num_classes: dict[str, int], train_names: list[str], test_names: list[str]
) -> None:
    """The model's class count must be the training set's; test sets need the same classes.

    Args:
        num_classes: ``{config key: value}`` of the model's class counts.
        train_names, test_names: registered dataset names.

    Raises:
        PhaseConfigError: naming the key, its value and the dataset's categories.
    """
    if not train_names:
        return
    classes = _classes(train_names[0])
    for name in [*train_names[1:], *test_names]:
        other = _classes(name)
        if other and classes and other != classes:
            raise PhaseConfigError(
                f"dataset '{name}' has the categories {other}, but the training set "
                f"'{train_names[0]}' has {classes}: training and test sets must have the same "
                "categories, in the same order"
            )
    if not classes:
        return
    for key, value in num_classes.items():
        if value != len(classes):
            raise PhaseConfigError(
                f"{key} = {value}, but the training set '{train_names[0]}' has "
                f"{len(classes)} categories ({', '.join(classes[:20])}"
                f"{', ...' if len(classes) > 20 else ''}): set {key} {len(classes)}"
            )


def check_weights_used(phases: list[Phase], weights_key: str, weights: str) -> None:
    """Refuse initial weights that no active phase would load (INIT is not "weights")."""
    if not weights:
        return
    if not any(p.INIT == "weights" for p in phases):
        inits = ", ".join(f"{p.NAME}: {p.INIT}" for p in phases)
        raise PhaseConfigError(
            f"{weights_key} = '{weights}' would be ignored: no phase starts from it ({inits}). "
            f"Set DIRECT_PRETRAIN.<PHASE>.INIT weights for the phase that should, or set "
            f"{weights_key} to ''."
        )


def warn_unused_datasets(node, used: list[str]) -> None:
    """Warn about datasets registered by ``DIRECT_PRETRAIN.REGISTER_COCO`` (``_VOC``,
    ``_YOLO``) that no phase uses."""
    unused = {
        key: [name for name in (str(entry[0]) for entry in node[key]) if name not in used]
        for key, _ in REGISTER_KEYS.values()
    }
    named = [f"DIRECT_PRETRAIN.{key} registers {names}" for key, names in unused.items() if names]
    if named:
        logger.warning(
            "%s, but no phase uses %s: the phases train and evaluate on %s. Name them in "
            "DATASETS.TRAIN / DATASETS.TEST (LazyConfig: dataloader.train/test.dataset.names).",
            " and ".join(named),
            "it" if sum(map(len, unused.values())) == 1 else "them",
            used,
        )


def warn_left_out_images(train_names: list[str], num_kept: int, keep_override: str) -> None:
    """Warn if the training set keeps fewer images than its datasets register: Detectron2's
    loader leaves out images without usable annotations (no boxes, or crowd boxes only)."""
    total = sum(len(DatasetCatalog.get(name)) for name in train_names)
    if num_kept < total:
        logger.warning(
            "Training set %s: %d of %d images have no usable annotations (no boxes, or crowd "
            "boxes only) and are left out of training. Images without objects teach the "
            "detector what is not an object (fewer false positives); %s keeps them.",
            ", ".join(f"'{name}'" for name in train_names),
            total - num_kept,
            total,
            keep_override,
        )


def dataset_fingerprints(names: list[str]) -> dict[str, str]:
    """``{name: digest}`` of each dataset's content: its annotation file (boxes, categories,
    image list), or its dataset dicts if it has no annotation file."""
    return {name: _fingerprint(name) for name in names}


def _fingerprint(name: str) -> str:
    digest = hashlib.sha256()
    json_file = MetadataCatalog.get(name).get("json_file", None)
    if json_file and os.path.isfile(json_file):
        with open(json_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        dicts = DatasetCatalog.get(name)
        digest.update(json.dumps(dicts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# A box smaller than this (pixels) at a phase's scale is below what the finest FPN level
# (stride 4) and the usual smallest anchors (16-32 px) can localise well.
SMALL_BOX = 8.0
# Warn when more than this share of the boxes is that small at a phase's training scale.
SMALL_SHARE_WARNING = 0.25


def describe_data(dicts: list[dict], phases: list[Phase], class_names, path) -> dict:
    """The training set's fingerprint with each phase's view of it (box sides at the phase's
    training and test scales, share of boxes under ``SMALL_BOX`` px), logged as a table, saved
    as JSON at ``path``, with a warning naming the keys of a phase that shrinks most boxes
    below ``SMALL_BOX``."""
    figures = dataset_fingerprint(dicts, list(class_names or []))
    sides, images = box_sides(dicts)
    heights = np.asarray([d["height"] for d in dicts], dtype=float)[images]
    widths = np.asarray([d["width"] for d in dicts], dtype=float)[images]
    side = figures.get("box_side_px", {})
    logger.info(
        "Training set: %d images (short side p50 %s px), %d boxes, box side p10/p50/p90 %s/%s/%s "
        "px; fingerprint in %s",
        figures["images"],
        figures.get("image_height", {}).get("p50"),
        figures["boxes"],
        side.get("p10"),
        side.get("p50"),
        side.get("p90"),
        path,
    )
    figures["phases"] = {}
    for phase in phases:
        train = sides * np.asarray([phase.train_scale(h, w) for h, w in zip(heights, widths)])
        test = sides * np.asarray([phase.test_scale(h, w) for h, w in zip(heights, widths)])
        small = float(np.mean(train < SMALL_BOX)) if len(train) else 0.0
        view = {
            "box_side_train_px": _percentiles(train),
            "box_side_test_px": _percentiles(test),
            f"share_under_{SMALL_BOX:g}px_train": round(small, 3),
        }
        figures["phases"][phase.NAME] = view
        logger.info(
            "Phase %s: box side p10/p50 %s/%s px in training, %s/%s px at test; %.0f%% of boxes "
            "under %g px in training",
            phase.NAME,
            view["box_side_train_px"].get("p10"),
            view["box_side_train_px"].get("p50"),
            view["box_side_test_px"].get("p10"),
            view["box_side_test_px"].get("p50"),
            100 * small,
            SMALL_BOX,
        )
        if small > SMALL_SHARE_WARNING:
            keys = "SCALE" if phase.AUGMENTATION == "fixed_size_crop" else "MIN_SIZE_TRAIN"
            value = phase.SCALE if keys == "SCALE" else phase.MIN_SIZE_TRAIN
            logger.warning(
                "DIRECT_PRETRAIN.%s.%s = %s shrinks %.0f%% of the training boxes below %g px "
                "(box side p50 %s px at that scale): the detector can hardly learn them. "
                "Consider a larger size for this phase.",
                phase.NAME,
                keys,
                tuple(value),
                100 * small,
                SMALL_BOX,
                view["box_side_train_px"].get("p50"),
            )
    atomic_write_json(path, figures)
    return figures


def _percentiles(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)), 1) for p in PERCENTILES}
