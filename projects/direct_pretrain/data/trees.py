"""NEON tree crowns: the embedded default dataset, built from deepforest's data files.

deepforest==2.1.0 ships four aerial RGB images with Pascal VOC tree-crown boxes. They are cut
into fixed-size square tiles and written as a single-class ("tree") COCO dataset:

* Tiling: tile origins are every ``tile_size`` pixels; the last tile of a row or column is
  moved back to end at the image border, so every pixel is covered, tiles are never padded,
  and only neighbouring edge tiles overlap.
* Cut crowns: a box crossing a tile border is clipped to the tile. If at least
  ``MIN_VISIBLE`` of its area is inside the tile it stays a normal box; a smaller remnant
  becomes an ``iscrowd`` region, which COCO evaluation ignores (a detection on it is neither
  a hit nor a false positive) and Detectron2 training treats as background.
* Split: validation tiles are every ``val_every``-th tile (in a fixed order) among the tiles
  that overlap no other tile, so no pixel is in both splits. The two 400x400 images are cut
  into overlapping tiles only and therefore are all training data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.io import atomic_write_text

__all__ = [
    "SOURCES",
    "TreeTile",
    "build_neon_trees",
    "deepforest_data_dir",
    "source_coco",
    "tile_origins",
]

SOURCES = (
    "OSBS_029",
    "SOAP_061",
    "2019_YELL_2_541000_4977000_image_crop",
    "2019_YELL_2_528000_4978000_image_crop2",
)
CATEGORY = {"id": 1, "name": "tree"}
MIN_VISIBLE = 0.5
BUILDER_VERSION = 1  # bump when the output format or rules change


@dataclass(frozen=True)
class TreeTile:
    """One tile: source image stem and pixel rectangle (x0, y0, x1, y1)."""

    source: str
    x0: int
    y0: int
    size: int

    @property
    def rect(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.size, self.y0 + self.size

    @property
    def file_name(self) -> str:
        return f"{self.source}_x{self.x0}_y{self.y0}.png"


def deepforest_data_dir() -> Path:
    """Folder of deepforest's data files, found without importing deepforest."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded dataset needs the data files of deepforest==2.1.0: run `make setup` "
            "(or `pip install --no-deps deepforest==2.1.0`)."
        )
    return Path(spec.origin).parent / "data"


def tile_origins(length: int, tile: int) -> list[int]:
    """Origins along one axis: every ``tile`` pixels, the last one moved back to the border."""
    if length < tile:
        raise ValueError(f"image side {length} is smaller than the tile size {tile}")
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def read_voc_boxes(xml_path: Path) -> np.ndarray:
    """Boxes (N, 4) in absolute XYXY pixels from a Pascal VOC file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{xml_path}: cannot read Pascal VOC annotations ({e})") from e
    boxes = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        boxes.append([float(bnd.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def make_tiles(sizes: dict[str, tuple[int, int]], tile: int) -> list[TreeTile]:
    """All tiles of all sources, in a fixed order. ``sizes`` maps stem -> (width, height).

    A source with a side shorter than ``tile`` is cut in square tiles of that shorter side.
    """
    tiles = []
    for stem in SOURCES:
        width, height = sizes[stem]
        side = min(tile, width, height)
        tiles += [
            TreeTile(stem, x, y, side)
            for y in tile_origins(height, side)
            for x in tile_origins(width, side)
        ]
    return tiles


def split_tiles(tiles: list[TreeTile], val_every: int) -> tuple[list[TreeTile], list[TreeTile]]:
    """(train, val): val is every ``val_every``-th tile among those overlapping no other tile."""
    isolated = [
        t
        for t in tiles
        if not any(o is not t and o.source == t.source and _overlaps(t.rect, o.rect) for o in tiles)
    ]
    val = set(isolated[val_every // 2 :: val_every])
    return [t for t in tiles if t not in val], [t for t in tiles if t in val]


def tile_annotations(boxes: np.ndarray, tile: TreeTile) -> list[dict]:
    """COCO annotations (without ids) of the crowns visible in ``tile``."""
    x0, y0, x1, y1 = tile.rect
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x0, x1),
            np.clip(boxes[:, 1], y0, y1),
            np.clip(boxes[:, 2], x0, x1),
            np.clip(boxes[:, 3], y0, y1),
        ],
        axis=1,
    )
    full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    anns = []
    for box, vis, area in zip(clipped, visible, full):
        if vis <= 0 or area <= 0:
            continue
        bx, by = box[0] - x0, box[1] - y0
        w, h = box[2] - box[0], box[3] - box[1]
        anns.append(
            {
                "bbox": [
                    round(float(bx), 2),
                    round(float(by), 2),
                    round(float(w), 2),
                    round(float(h), 2),
                ],
                "area": round(float(vis), 2),
                "iscrowd": int(vis / area < MIN_VISIBLE),
                "category_id": CATEGORY["id"],
            }
        )
    return anns


def source_coco(stem: str, data_dir: Path | None = None) -> tuple[Path, dict]:
    """A source image's path and all its crowns, un-tiled, as a one-image COCO dict."""
    data_dir = Path(data_dir) if data_dir else deepforest_data_dir()
    path = data_dir / f"{stem}.png"
    if stem not in SOURCES or not path.is_file():
        raise FileNotFoundError(f"embedded dataset: no source image '{stem}' ({path})")
    with Image.open(path) as image:
        width, height = image.size
    boxes = read_voc_boxes(data_dir / f"{stem}.xml")
    boxes = np.clip(boxes, 0, [width, height, width, height])  # as tiles clip them
    annotations = []
    for x0, y0, x1, y1 in boxes.tolist():
        if x1 > x0 and y1 > y0:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "iscrowd": 0,
                    "category_id": CATEGORY["id"],
                }
            )
    return path, {
        "images": [{"id": 1, "file_name": path.name, "width": width, "height": height}],
        "annotations": annotations,
        "categories": [CATEGORY],
    }


def _source_digest(data_dir: Path, tile: int, val_every: int) -> str:
    digest = hashlib.sha256(f"v{BUILDER_VERSION} tile={tile} val_every={val_every}".encode())
    for stem in SOURCES:
        for suffix in (".png", ".xml"):
            path = data_dir / f"{stem}{suffix}"
            if not path.is_file():
                raise FileNotFoundError(f"embedded dataset: missing source file {path}")
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _coco(tiles: list[TreeTile], boxes: dict[str, np.ndarray]) -> dict:
    images, annotations = [], []
    for image_id, t in enumerate(tiles, start=1):
        images.append({"id": image_id, "file_name": t.file_name, "width": t.size, "height": t.size})
        for ann in tile_annotations(boxes[t.source], t):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {"images": images, "annotations": annotations, "categories": [CATEGORY]}


def build_neon_trees(
    cache_dir: str | os.PathLike,
    tile: int = 256,
    val_every: int = 4,
    data_dir: Path | None = None,
) -> dict[str, tuple[str, str]]:
    """Build (once) and return ``{"train"|"val": (json_file, image_root)}``.

    The output folder is keyed by the source files' content and the tiling parameters, so a
    change of either builds a new copy; it is written under a temporary name and renamed
    when complete, so an interrupted build is never used.
    """
    data_dir = Path(data_dir) if data_dir else deepforest_data_dir()
    key = _source_digest(data_dir, tile, val_every)
    out = Path(cache_dir).expanduser() / "neon_trees" / f"tile{tile}-{key}"
    result = {s: (str(out / f"{s}.json"), str(out / "images")) for s in ("train", "val")}
    if (out / "COMPLETE").is_file():
        return result

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        arrays = {s: np.asarray(Image.open(data_dir / f"{s}.png").convert("RGB")) for s in SOURCES}
        boxes = {s: read_voc_boxes(data_dir / f"{s}.xml") for s in SOURCES}
        sizes = {s: (a.shape[1], a.shape[0]) for s, a in arrays.items()}
        tiles = make_tiles(sizes, tile)
        for t in tiles:
            x0, y0, x1, y1 = t.rect
            Image.fromarray(arrays[t.source][y0:y1, x0:x1]).save(tmp / "images" / t.file_name)
        train, val = split_tiles(tiles, val_every)
        for split, members in (("train", train), ("val", val)):
            atomic_write_text(tmp / f"{split}.json", json.dumps(_coco(members, boxes)))
        (tmp / "COMPLETE").write_text("")
        if out.exists() and not (out / "COMPLETE").is_file():  # damaged copy
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "COMPLETE").is_file():
                raise  # else another process finished the same build first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
