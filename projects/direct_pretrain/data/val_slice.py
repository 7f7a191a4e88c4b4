"""The validation slice: training images held out of training, on which a run chooses its final
model (never on the test sets).

:func:`carve_val_slice` takes the images whose crc32 of their path (relative to their dataset's
image folder) is smallest: the same images whatever the order of the dataset, the seed, the
process or the folder the dataset lives in. It registers, in the calling process, each training
dataset without them (``<name>-without-val-slice-<digest>``) and the slice itself
(``val-slice-<digest>``, COCO json written by :func:`write_slice_json`). The digest names the
held-out images: another slice is another training set, which a phase folder notices.
"""

from __future__ import annotations

import copy
import functools
import os
import zlib
from dataclasses import dataclass

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict

from ..utils.io import atomic_write_json

__all__ = [
    "MIN_TRAIN_IMAGES",
    "ValSlice",
    "carve_val_slice",
    "held_out",
    "slice_of",
    "slice_size",
    "write_slice_json",
]

# No slice is carved from a training set smaller than this.
MIN_TRAIN_IMAGES = 20
# Metadata of a training dataset without the slice: the slice's dataset name.
_SLICE_ATTR = "val_slice"


@dataclass(frozen=True)
class ValSlice:
    """A carved validation slice and the training datasets without it."""

    name: str  # the slice's dataset
    train_names: tuple[str, ...]  # the training datasets without the slice
    sources: tuple[str, ...]  # the training datasets it is carved from
    images: int  # images in the slice
    total: int  # training images (after Detectron2's filtering) it is carved from
    json_file: str  # its COCO json, for the evaluator


def slice_size(num_images: int, fraction: float, max_images: int) -> int:
    """Images in the slice of a training set of ``num_images``: ``fraction`` of them (at least
    one, at most ``max_images``); 0 below ``MIN_TRAIN_IMAGES`` images."""
    if num_images < MIN_TRAIN_IMAGES or fraction <= 0:
        return 0
    return min(max_images, max(1, round(fraction * num_images)))


def _key(file_name: str, roots: list[str]) -> str:
    """``file_name`` relative to the first of ``roots`` that holds it (else as it is)."""
    for root in roots:
        prefix = root.rstrip(os.sep) + os.sep
        if root and file_name.startswith(prefix):
            return file_name[len(prefix) :]
    return file_name


def held_out(dicts: list[dict], size: int, roots: list[str]) -> list[dict]:
    """The ``size`` dataset dicts whose path relative to ``roots`` has the smallest crc32 (ties
    broken by the path), one per image."""
    unique = {_key(d["file_name"], roots): d for d in reversed(dicts)}
    ranked = sorted(unique, key=lambda key: (zlib.crc32(key.encode()), key))
    return [unique[key] for key in ranked[:size]]


def _without(source: str, files: frozenset[str]) -> list[dict]:
    return [d for d in DatasetCatalog.get(source) if d["file_name"] not in files]


def _register(name: str, loader, metadata: dict) -> None:
    if name in DatasetCatalog.list():  # registered again, e.g. a rerun in this process
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _metadata(name: str) -> dict:
    """A dataset's metadata but its name and annotation file (classes, category ids...)."""
    meta = MetadataCatalog.get(name).as_dict()
    return {k: v for k, v in meta.items() if k not in ("name", "json_file")}


def carve_val_slice(
    train_names: list[str], dicts: list[dict], fraction: float, max_images: int, json_file: str
) -> ValSlice | None:
    """Carve the validation slice out of the training set and register it and the training
    datasets without it (in this process; call it in every process).

    Args:
        train_names: the training datasets (registered, loaded once: their classes are known).
        dicts: their dataset dicts after Detectron2's filtering (what training reads).
        fraction, max_images: the slice's size (:func:`slice_size`).
        json_file: where the slice's COCO json will be (:func:`write_slice_json`).

    Returns:
        The slice, or None where :func:`slice_size` is 0.
    """
    size = slice_size(len(dicts), fraction, max_images)
    if not size:
        return None
    roots = [MetadataCatalog.get(name).get("image_root", None) or "" for name in train_names]
    chosen = held_out(dicts, size, roots)
    keys = sorted(_key(d["file_name"], roots) for d in chosen)
    digest = f"{zlib.crc32(chr(10).join(keys).encode()):08x}"
    name = f"val-slice-{digest}"
    files = frozenset(d["file_name"] for d in chosen)
    reduced = []
    for source in train_names:
        reduced.append(f"{source}-without-val-slice-{digest}")
        loader = functools.partial(_without, source, files)
        _register(reduced[-1], loader, {**_metadata(source), _SLICE_ATTR: name})
    # Image ids renumbered: those of several training datasets may coincide.
    records = [{**copy.deepcopy(d), "image_id": i} for i, d in enumerate(chosen, 1)]
    metadata = {k: v for k, v in _metadata(train_names[0]).items() if k != "image_root"}
    _register(name, lambda: copy.deepcopy(records), {**metadata, "json_file": json_file})
    return ValSlice(name, tuple(reduced), tuple(train_names), size, len(dicts), json_file)


def write_slice_json(val_slice: ValSlice) -> None:
    """Write the slice's COCO json (images, boxes, the training set's category ids)."""
    atomic_write_json(val_slice.json_file, convert_to_coco_dict(val_slice.name))


def slice_of(train_names: list[str]) -> str | None:
    """The validation slice held out of the training datasets ``train_names``, or None."""
    if not train_names or train_names[0] not in DatasetCatalog.list():
        return None
    return MetadataCatalog.get(train_names[0]).get(_SLICE_ATTR, None)
