"""Dataset registration from the config: the embedded tree-crown dataset and the user's COCO
files, Pascal VOC and YOLO label folders (converted to COCO by :mod:`.formats`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .formats import converted_coco_json
from .trees import build_neon_trees
from .validate import REGISTER_KEYS, checked_coco_json

__all__ = ["EMBEDDED", "cache_dir", "register_datasets", "register_named_datasets"]

# Embedded datasets: registered name -> split of the built tree-crown dataset.
EMBEDDED = {"neon_trees_train": "train", "neon_trees_val": "val"}


def cache_dir(node) -> Path:
    """Folder for built datasets and caches (``DIRECT_PRETRAIN.CACHE_DIR`` of ``node``)."""
    path = node.CACHE_DIR or os.environ.get("DIRECT_PRETRAIN_CACHE", "~/.cache/direct_pretrain")
    return Path(path).expanduser()


def _register(name: str, json_file: str, image_root: str) -> None:
    if name in DatasetCatalog.list():  # registered again, e.g. with other files
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)


def _check_entry(key: str, fields: tuple[str, ...], index: int, entry) -> list:
    """``entry`` of ``DIRECT_PRETRAIN.<key>`` as ``[name, labels, image_root, *rest]`` (the first
    three as strings), after checking its shape and that its paths exist."""
    where = f"DIRECT_PRETRAIN.{key}[{index}]"
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != len(fields):
        raise ValueError(f"{where} must be [{', '.join(fields)}], got {entry!r}")
    name, labels, image_root = (str(x) for x in entry[:3])
    if not os.path.exists(labels):  # one of another format is named by the format's check
        raise FileNotFoundError(f"{where} ('{name}'): {fields[1]} '{labels}' not found")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{where} ('{name}'): image folder '{image_root}' not found")
    return [name, labels, image_root, *entry[3:]]


def register_datasets(cfg: CfgNode) -> None:
    """Register the datasets a yacs config names (see :func:`register_named_datasets`)."""
    register_named_datasets(cfg.DIRECT_PRETRAIN, [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])


def register_named_datasets(node, wanted: list[str]) -> None:
    """Register every dataset in ``wanted`` that Detectron2 does not know already.

    Builds the embedded tree-crown dataset (once, cached) if ``wanted`` names it, and registers
    each entry of ``node.REGISTER_COCO``, ``REGISTER_VOC`` and ``REGISTER_YOLO`` (``node`` is
    the ``DIRECT_PRETRAIN`` node; VOC and YOLO converted to a COCO json, :mod:`.formats`) after
    checking it (:mod:`.validate`; a repaired copy replaces a file with boxes outside their
    image). Call it in every process (cheap when cached).
    """
    cache = cache_dir(node)
    for label_format, (key, fields) in REGISTER_KEYS.items():
        for index, entry in enumerate(node[key]):
            name, labels, image_root, *classes = _check_entry(key, fields, index, entry)
            if label_format == "COCO":
                json_file = checked_coco_json(name, labels, cache)
            else:
                converted = converted_coco_json(
                    name, label_format, labels, image_root, classes[0], cache
                )
                origin = f"{label_format} labels '{labels}', converted to {converted}"
                json_file = checked_coco_json(name, converted, cache, origin)
            _register(name, json_file, image_root)
    wanted = set(wanted)
    embedded = wanted & EMBEDDED.keys()
    if embedded:
        built = build_neon_trees(cache_dir(node))
        for name in sorted(embedded):
            _register(name, *built[EMBEDDED[name]])
    missing = sorted(n for n in wanted if n not in DatasetCatalog.list())
    if missing:
        ways = "; ".join(
            f"{label_format}: DIRECT_PRETRAIN.{key} [[{', '.join(fields)}]]"
            for label_format, (key, fields) in REGISTER_KEYS.items()
        )
        raise KeyError(
            f"the config names unregistered dataset(s) {missing}. Register your datasets with "
            f"{ways}. Embedded ones: {sorted(EMBEDDED)}."
        )
    for name in sorted(wanted):
        meta = MetadataCatalog.get(name)
        for attr, check in (("json_file", os.path.isfile), ("image_root", os.path.isdir)):
            path = meta.get(attr, None)
            if path is not None and not check(path):
                raise FileNotFoundError(
                    f"dataset '{name}': {attr} '{path}' not found (Detectron2's builtin "
                    "datasets live under $DETECTRON2_DATASETS, default ./datasets)"
                )
