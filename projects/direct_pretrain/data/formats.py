"""Pascal VOC and YOLO label folders, converted once to a COCO json that is registered as COCO.

Pascal VOC (``REGISTER_VOC``): one ``.xml`` per image, named like it (``a.xml`` for ``a.jpg``,
any image extension; sub-folders mirror those of the image folder), with ``<object>``s of a
``<name>`` and a ``<bndbox>`` ``xmin ymin xmax ymax`` in VOC's 1-based pixel indices, both ends
included: the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``, as
Detectron2's own VOC loader reads it. ``<size>`` gives the image size (read from the image
header if it is missing or 0). An object marked ``<difficult>1`` becomes a crowd box
(``iscrowd`` 1): left out of training, and ignored by the COCO evaluation (a detection on it
counts neither way), as VOC's metric ignores it. Images without an ``.xml`` are not in the
dataset.

YOLO (``REGISTER_YOLO``): one ``.txt`` per image, named like it, with lines ``class cx cy w h``:
a 0-based index into the class list, then the box centre and size as fractions 0-1 of the
image's upright (EXIF-oriented) size, read from its header. An image without a ``.txt`` has no
objects; a top-level ``classes.txt`` among the labels is the class list, not a label file.

Classes: a list of names, or a file: ``classes.txt`` (one name a line) or a YOLO ``data.yaml``
(``names``: a list or ``{index: name}``). COCO category ids are 1, 2, ... in that order.

Every problem is a :class:`.validate.DatasetError` naming the file and, inside it, the line.
The COCO json is written once under ``<cache>/converted/``, keyed by the label files', the
images' and the class list's content signatures, and is then checked like any COCO file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

import yaml
from PIL import Image

from ..utils.io import atomic_write_json, file_signature
from .validate import DatasetError, found_format, registered_with

__all__ = ["converted_coco_json", "read_classes"]

logger = logging.getLogger(__name__)
CONVERT_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_LABEL_SUFFIX = {"Pascal VOC": ".xml", "YOLO": ".txt"}
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# An object: (class index, COCO bbox [x, y, w, h], iscrowd).
_Object = tuple[int, list[float], int]


@dataclass
class _Element:
    """An XML element and the line it starts on (ElementTree keeps no line numbers)."""

    tag: str
    line: int
    text: str = ""
    children: list[_Element] = field(default_factory=list)

    def find(self, tag: str) -> _Element | None:
        return next((child for child in self.children if child.tag == tag), None)

    def child_text(self, tag: str) -> str | None:
        child = self.find(tag)
        return None if child is None else child.text.strip()


def _parse_xml(path: Path, where: str) -> _Element:
    """The root element of the XML file ``path``; ``where`` starts error messages."""
    document = _Element("", 0)
    stack = [document]
    parser = expat.ParserCreate()

    def start(tag: str, _attributes: dict) -> None:
        element = _Element(tag, parser.CurrentLineNumber)
        stack[-1].children.append(element)
        stack.append(element)

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = text
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as e:
        raise DatasetError(
            f"{where} line {e.lineno}: not well-formed XML ({expat.ErrorString(e.code)})"
        ) from e
    return document.children[0]


def _finite_numbers(texts: list[str | None]) -> list[float] | None:
    """``texts`` as finite numbers, or None if one is not a finite number."""
    try:
        numbers = [float(text) for text in texts]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _listed(names: list[str]) -> str:
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _classes_file(name: str, path: str) -> list[str]:
    """The class names of a ``classes.txt`` (one a line) or a ``data.yaml`` (``names``)."""
    if not os.path.isfile(path):
        raise DatasetError(
            f"dataset '{name}': class file '{path}' not found (give a classes.txt, a data.yaml "
            "or a list of class names)"
        )
    if not path.endswith((".yaml", ".yml")):
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"dataset '{name}': cannot read '{path}' as YAML: {e}") from e
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list):
        raise DatasetError(
            f"dataset '{name}': '{path}' has no 'names' list (or {{index: name}} with the "
            "indices 0, 1, ...)"
        )
    return [str(n) for n in names]


def read_classes(name: str, classes) -> list[str]:
    """The class names ``classes`` gives: a list of names, or a classes.txt / data.yaml file."""
    if isinstance(classes, str):
        names, source = _classes_file(name, classes), f"'{classes}'"
    else:
        names, source = [str(c) for c in classes], "the class list"
    if not names:
        raise DatasetError(f"dataset '{name}': {source} has no class names")
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"dataset '{name}': {source} names {_listed(repeated)} more than once")
    return names


def _by_stem(name: str, folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files in ``folder`` (and below) with one of ``suffixes``, by relative path without it."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in files:
            raise DatasetError(
                f"dataset '{name}': '{files[stem]}' and '{path}' have the same name: a label "
                "file belongs to the image of its name; rename one"
            )
        files[stem] = path
    return files


def _image_size(name: str, path: Path) -> tuple[int, int]:
    """Upright (EXIF-oriented) width and height of an image, from its header."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(_EXIF_ORIENTATION) in _TURNED
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"dataset '{name}': cannot read the size of image '{path}': {e}") from e
    return (height, width) if turned else (width, height)


def _voc_objects(
    name: str, label: Path, image: Path, classes: list[str]
) -> tuple[int, int, list[_Object]]:
    """Width, height and objects of one Pascal VOC ``.xml`` file."""
    where = f"dataset '{name}': '{label}'"
    root = _parse_xml(label, where)
    if root.tag != "annotation":
        raise DatasetError(f"{where} line {root.line}: root <{root.tag}>, not <annotation>")
    size = root.find("size")
    width, height = _finite_numbers(
        [None if size is None else size.child_text(key) for key in ("width", "height")]
    ) or (0, 0)
    if width <= 0 or height <= 0:
        width, height = _image_size(name, image)
    objects = []
    for obj in (child for child in root.children if child.tag == "object"):
        class_name, box = obj.child_text("name"), obj.find("bndbox")
        if class_name is None or box is None:
            missing = "<name>" if class_name is None else "<bndbox>"
            raise DatasetError(f"{where} line {obj.line}: <object> without {missing}")
        if class_name not in classes:
            raise DatasetError(
                f"{where} line {obj.find('name').line}: class '{class_name}' is not in the "
                f"class list ({_listed(classes)})"
            )
        corners = _finite_numbers([box.child_text(key) for key in ("xmin", "ymin", "xmax", "ymax")])
        if corners is None:
            raise DatasetError(
                f"{where} line {box.line}: <bndbox> needs the numbers <xmin>, <ymin>, <xmax>, "
                "<ymax>"
            )
        x0, y0, x1, y1 = corners
        bbox = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]  # 1-based pixels, both ends included
        objects.append((classes.index(class_name), bbox, int(obj.child_text("difficult") == "1")))
    return int(width), int(height), objects


def _yolo_objects(
    name: str, label: Path | None, image: Path, classes: list[str]
) -> tuple[int, int, list[_Object]]:
    """Width, height and objects of one image and its YOLO ``.txt`` file (None: no objects)."""
    width, height = _image_size(name, image)
    objects = []
    lines = label.read_text().splitlines() if label else []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"dataset '{name}': '{label}' line {number}"
        values = _finite_numbers(line.split())
        if values is None or len(values) != 5:
            raise DatasetError(f"{at}: expected 5 numbers 'class cx cy w h', got '{line.strip()}'")
        index, cx, cy, w, h = values
        if not index.is_integer() or not 0 <= index < len(classes):
            raise DatasetError(
                f"{at}: class {line.split()[0]} is not an index of the {len(classes)} classes "
                f"(0-{len(classes) - 1}: {_listed(classes)})"
            )
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):
            raise DatasetError(
                f"{at}: coordinates outside 0-1 in '{line.strip()}' (cx cy w h are fractions "
                "of the image's width and height)"
            )
        bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        objects.append((int(index), bbox, 0))
    return width, height, objects


def _coco(entries: list[tuple[str, tuple[int, int, list[_Object]]]], classes: list[str]) -> dict:
    """A COCO detection json of ``(file_name, (width, height, objects))`` per image."""
    images, annotations = [], []
    for image_id, (file_name, (width, height, objects)) in enumerate(entries, 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for index, bbox, iscrowd in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": index + 1,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": iscrowd,
                }
            )
    categories = [{"id": i + 1, "name": class_name} for i, class_name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def converted_coco_json(
    name: str, label_format: str, folder: str, image_root: str, classes, cache_dir: Path
) -> str:
    """The COCO json of dataset ``name``: its ``label_format`` ("Pascal VOC" or "YOLO") label
    files in ``folder`` and images in ``image_root``, converted once (cached by content).

    Raises:
        DatasetError: ``folder`` holds no such label files (naming the format it holds), a
            label file has no image, or a file is malformed (naming the file and line).
    """
    suffix = _LABEL_SUFFIX[label_format]
    images = _by_stem(name, Path(image_root), IMAGE_SUFFIXES)
    labels = _by_stem(name, Path(folder), (suffix,)) if os.path.isdir(folder) else {}
    if "classes" not in images:
        labels.pop("classes", None)  # YOLO's classes.txt beside the labels
    if not labels:
        found, what = found_format(folder)
        hint = f"; {registered_with(found)}" if found and found != label_format else ""
        raise DatasetError(
            f"dataset '{name}': '{folder}' is {what}, not a folder of {label_format} "
            f"{suffix} files{hint}"
        )
    orphans = [stem for stem in labels if stem not in images]
    if orphans:
        raise DatasetError(
            f"dataset '{name}': {len(orphans)} label file(s) without an image in '{image_root}' "
            f"(same name, one of {', '.join(IMAGE_SUFFIXES)}), e.g. '{labels[orphans[0]]}'"
        )
    classes = read_classes(name, classes)
    signatures = [
        [[stem, file_signature(path)] for stem, path in files.items()] for files in (labels, images)
    ]
    roots = [os.path.abspath(folder), os.path.abspath(image_root)]
    content = json.dumps([CONVERT_VERSION, label_format, roots, classes, signatures])
    path = cache_dir / "converted" / f"{hashlib.sha256(content.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        if label_format == "YOLO":  # every image; one without labels has no objects
            stems, objects_of = sorted(images), _yolo_objects
        else:  # the images with an .xml
            stems, objects_of = sorted(labels), _voc_objects
        entries = [
            (
                images[stem].relative_to(image_root).as_posix(),
                objects_of(name, labels.get(stem), images[stem], classes),
            )
            for stem in stems
        ]
        atomic_write_json(path, _coco(entries, classes))
        logger.info(
            "Dataset '%s': %d %s label files of '%s' converted to %s",
            name,
            len(labels),
            label_format,
            folder,
            path,
        )
    return str(path)
