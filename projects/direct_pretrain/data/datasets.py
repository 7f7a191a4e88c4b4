"""Dataset registration from the config: the embedded tree-crown dataset and user COCO files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .trees import build_neon_trees
from .validate import checked_coco_json

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


def _check_entry(index: int, entry) -> tuple[str, str, str]:
    where = f"DIRECT_PRETRAIN.REGISTER_COCO[{index}]"
    if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 3:
        raise ValueError(f"{where} must be [name, json_file, image_root], got {entry!r}")
    name, json_file, image_root = (str(x) for x in entry)
    if not os.path.exists(json_file):  # a folder: refused by checked_coco_json
        raise FileNotFoundError(f"{where} ('{name}'): annotation file '{json_file}' not found")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{where} ('{name}'): image folder '{image_root}' not found")
    return name, json_file, image_root


def register_datasets(cfg: CfgNode) -> None:
    """Register the datasets a yacs config names (see :func:`register_named_datasets`)."""
    register_named_datasets(cfg.DIRECT_PRETRAIN, [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])


def register_named_datasets(node, wanted: list[str]) -> None:
    """Register every dataset in ``wanted`` that Detectron2 does not know already.

    Builds the embedded tree-crown dataset (once, cached) if ``wanted`` names it, and registers
    each ``[name, json_file, image_root]`` of ``node.REGISTER_COCO`` (``node`` is the
    ``DIRECT_PRETRAIN`` node) after checking it (:mod:`.validate`; a repaired copy replaces a
    file with boxes outside their image). Call it in every process (cheap when cached).
    """
    for index, entry in enumerate(node.REGISTER_COCO):
        name, json_file, image_root = _check_entry(index, entry)
        _register(name, checked_coco_json(name, json_file, cache_dir(node)), image_root)
    wanted = set(wanted)
    embedded = wanted & EMBEDDED.keys()
    if embedded:
        built = build_neon_trees(cache_dir(node))
        for name in sorted(embedded):
            _register(name, *built[EMBEDDED[name]])
    missing = sorted(n for n in wanted if n not in DatasetCatalog.list())
    if missing:
        raise KeyError(
            f"the config names unregistered dataset(s) {missing}. Register a COCO "
            "dataset with DIRECT_PRETRAIN.REGISTER_COCO [[name, json_file, image_root]]; "
            f"embedded ones: {sorted(EMBEDDED)}."
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
