"""Check a user's COCO detection file before training on it; repair what is safe to repair.

Errors (a ``DatasetError`` naming the file and what was found): a file that is not a COCO
detection json (a folder, a JSON list, Pascal VOC or other XML, YOLO labels: those two name the
key that registers them, :data:`REGISTER_KEYS`), no images, no annotations, two images with the
same id or the same file name (their boxes would be merged or trained twice), an image without
width/height, an annotation whose ``image_id`` or ``category_id`` is not declared, a ``bbox``
that is not four numbers.

Repairs (counted and logged; a repaired copy is written to the cache and registered instead,
so training and evaluation see the same boxes): a box reaching outside its image is clipped to
it; a box with non-positive width or height, before or after clipping, is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from ..utils.errors import UserError
from ..utils.io import atomic_write_json

__all__ = [
    "REGISTER_KEYS",
    "DatasetError",
    "checked_coco_json",
    "found_format",
    "registered_with",
    "repair_coco",
]

logger = logging.getLogger(__name__)
_MAX_IDS = 10
CHECK_VERSION = 2  # 2: duplicate image ids / file names; cached verdicts of 1 are rechecked
_COCO_KEYS = ("images", "annotations", "categories")
_EXPECTED = (
    "expected a COCO detection json (an object with 'images', 'annotations' and 'categories')"
)
# Each annotation format: the DIRECT_PRETRAIN key that registers it and the fields of an entry.
REGISTER_KEYS = {
    "COCO": ("REGISTER_COCO", ("name", "json_file", "image_root")),
    "Pascal VOC": ("REGISTER_VOC", ("name", "annotations_dir", "image_root", "classes")),
    "YOLO": ("REGISTER_YOLO", ("name", "labels_dir", "image_root", "classes_file")),
}
_JSON_TYPES = {
    list: "a JSON list",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "a JSON boolean",
    type(None): "JSON null",
}


class DatasetError(UserError, ValueError):
    """A dataset file cannot be trained on; the message names the file and the ids."""


def _ids(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - _MAX_IDS} more" if len(items) > _MAX_IDS else ""
    return ", ".join(str(i) for i in items[:_MAX_IDS]) + more


def _is_box(bbox) -> bool:
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
    )


def registered_with(format_name: str) -> str:
    """Where annotations of ``format_name`` (a key of :data:`REGISTER_KEYS`) are registered."""
    key, fields = REGISTER_KEYS[format_name]
    return (
        f"{format_name} annotations are registered with DIRECT_PRETRAIN.{key} "
        f"[[{', '.join(fields)}], ...]"
    )


def _xml_root(path: str) -> str | None:
    """The root element's name if ``path`` starts as an XML document, else None."""
    try:
        _, root = next(ET.iterparse(path, events=("start",)))
    except (OSError, ET.ParseError, StopIteration):
        return None
    return root.tag.rsplit("}", 1)[-1]


def _is_yolo(path: str) -> bool:
    """Whether ``path`` starts with YOLO label lines: five numbers "class cx cy w h"."""
    try:
        with open(path) as f:
            rows = [[float(v) for v in f.readline(200).split()] for _ in range(20)]
    except (OSError, ValueError):
        return False
    rows = [row for row in rows if row]
    return bool(rows) and all(len(row) == 5 for row in rows)


def _is_coco(path: str) -> bool:
    """Whether ``path`` holds a JSON object with the COCO keys."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in _COCO_KEYS)


def _file_format(path: str) -> tuple[str | None, str | None]:
    """The format of a file and what it is in words; (None, None) if not recognised."""
    root = _xml_root(path)
    if root == "annotation":
        return "Pascal VOC", "a Pascal VOC annotation (XML, root <annotation>)"
    if root is not None:
        return None, f"an XML document (root <{root}>), not JSON"
    if _is_yolo(path):
        return "YOLO", "a file of YOLO labels (lines of 'class cx cy w h')"
    if _is_coco(path):
        return "COCO", "a COCO json file"
    return None, None


def _folder_format(folder: str) -> tuple[str | None, str]:
    """The format of the annotation files in ``folder`` and what it is in words."""
    xml_files = sorted(Path(folder).rglob("*.xml"))
    if xml_files and _xml_root(str(xml_files[0])) == "annotation":
        return "Pascal VOC", f"a folder of Pascal VOC annotations ({len(xml_files)} .xml files)"
    txt_files = sorted(Path(folder).rglob("*.txt"))
    if any(_is_yolo(str(path)) for path in txt_files[:20]):
        return "YOLO", f"a folder of YOLO labels ({len(txt_files)} .txt files)"
    json_files = sorted(p.name for p in Path(folder).glob("*.json"))
    if json_files:
        return "COCO", f"a folder of .json files ({_ids(json_files)})"
    return None, "a folder without Pascal VOC .xml, YOLO .txt or .json annotation files"


def found_format(path: str) -> tuple[str | None, str]:
    """The annotation format found at ``path`` (a key of :data:`REGISTER_KEYS`, or None) and
    what ``path`` is, in words (e.g. "a folder of YOLO labels (12 .txt files)")."""
    if os.path.isdir(path):
        return _folder_format(path)
    found, what = _file_format(path)
    return found, what or "a file"


def _load_coco(name: str, json_file: str) -> dict:
    """The COCO detection json ``json_file`` of dataset ``name``, loaded.

    Raises:
        DatasetError: naming the file and what it is instead (a folder, JSON that is not an
            object with the COCO keys, Pascal VOC or other XML, YOLO labels, unreadable).
    """
    source = f"dataset '{name}': '{json_file}'"
    if os.path.isdir(json_file):
        label_format, what = _folder_format(json_file)
        if label_format in ("Pascal VOC", "YOLO"):
            raise DatasetError(f"{source} is {what}: {registered_with(label_format)}; {_EXPECTED}")
        inside = sorted(p.name for p in Path(json_file).glob("*.json"))
        found = f"its .json files: {_ids(inside)}" if inside else "no .json file in it"
        raise DatasetError(f"{source} is a folder, not a file ({found}); {_EXPECTED}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        label_format, what = _file_format(json_file)
        if label_format:
            hint = registered_with(label_format)
            raise DatasetError(f"{source} is {what}: {hint}; {_EXPECTED}") from e
        if what:
            raise DatasetError(f"{source} is {what}; {_EXPECTED}") from e
        raise DatasetError(
            f"dataset '{name}': cannot read '{json_file}' as JSON: {e}; {_EXPECTED}"
        ) from e
    if not isinstance(data, dict):
        what = _JSON_TYPES[type(data)]
        size = f" (length {len(data)})" if isinstance(data, list) else ""
        raise DatasetError(f"{source} holds {what}{size}, not an object; {_EXPECTED}")
    missing = [key for key in _COCO_KEYS if key not in data]
    if missing:
        raise DatasetError(
            f"{source} holds a JSON object without {_ids(map(repr, missing))} (its keys: "
            f"{_ids(map(repr, data))}); {_EXPECTED}"
        )
    return data


def repair_coco(data: dict, source: str) -> tuple[dict, dict[str, int]]:
    """Validate ``data`` (a loaded COCO json) and return it repaired, with repair counts.

    Raises:
        DatasetError: the problems listed in the module docstring.
    """
    image_list = data.get("images", [])
    images = {img["id"]: img for img in image_list}
    annotations = data.get("annotations", [])
    categories = {c["id"] for c in data.get("categories", [])}
    if not images:
        raise DatasetError(f"{source}: no images")
    for key, what in (("id", "ids"), ("file_name", "file names")):
        counts = Counter(img.get(key) for img in image_list)
        repeated = [value for value, n in counts.items() if n > 1 and value is not None]
        if repeated:
            raise DatasetError(
                f"{source}: several images share the same {key} ({what} "
                f"{_ids(map(str, repeated))}); each image needs its own {key}"
            )
    if not annotations:
        raise DatasetError(
            f"{source}: no annotations (an empty annotation list has nothing "
            "to train or evaluate on)"
        )
    no_size = [i for i, img in images.items() if not (img.get("width") and img.get("height"))]
    if no_size:
        raise DatasetError(f"{source}: images without width/height: ids {_ids(no_size)}")
    problems = {
        "unknown image_id": [a["id"] for a in annotations if a.get("image_id") not in images],
        "category_id not in categories": [
            a["id"] for a in annotations if a.get("category_id") not in categories
        ],
        "bbox is not 4 finite numbers": [
            a["id"] for a in annotations if not _is_box(a.get("bbox"))
        ],
    }
    for what, bad in problems.items():
        if bad:
            raise DatasetError(
                f"{source}: annotations with {what}: ids {_ids(bad)}"
                + (
                    f" (declared categories: {_ids(categories)})"
                    if what.startswith("category")
                    else ""
                )
            )

    counts = {"clipped": 0, "dropped": 0}
    kept = []
    for ann in annotations:
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, img["width"]), min(y + h, img["height"])
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            counts["dropped"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["clipped"] += 1
            ann = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if "segmentation" not in ann:
                ann["area"] = (x1 - x0) * (y1 - y0)
        kept.append(ann)
    return {**data, "annotations": kept}, counts


def checked_coco_json(name: str, json_file: str, cache_dir: Path, origin: str = "") -> str:
    """The file to register for ``json_file``: itself if valid, else a repaired copy.

    The outcome is cached by the file's path, size and modification time. ``origin`` names
    the files ``json_file`` was converted from, in the messages.
    """
    stat = os.stat(json_file)
    key = hashlib.sha256(
        f"v{CHECK_VERSION}|{os.path.abspath(json_file)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    folder = cache_dir / "checked_coco"
    verdict_file = folder / f"{key}.verdict.json"
    if verdict_file.is_file():
        return json.loads(verdict_file.read_text())["use"]
    source = f"dataset '{name}' ({origin or json_file})"
    repaired, counts = repair_coco(_load_coco(name, json_file), source)
    use = json_file
    if counts["clipped"] or counts["dropped"]:
        use = str(folder / f"{key}.repaired.json")
        atomic_write_json(use, repaired)
        logger.warning(
            "Dataset '%s' (%s): %d boxes clipped to their image, %d boxes with "
            "non-positive size dropped; using the repaired copy %s",
            name,
            origin or json_file,
            counts["clipped"],
            counts["dropped"],
            use,
        )
    atomic_write_json(verdict_file, {"source": json_file, "use": use, **counts})
    return use
