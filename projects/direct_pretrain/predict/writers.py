"""Prediction outputs, written as each image finishes: a job log, COCO results JSON, a CSV
with one box per row, drawn images.

* ``predictions.jsonl``: one line per finished image, ``{file_name, width, height, tiles,
  drawn, detections: [{category_id, category_name, bbox: [x, y, w, h], score}]}``, appended,
  flushed and synced to disk as each image finishes: the record of what is done. A rerun on
  the same folder continues after the images it holds; a half-written last line (a job killed
  while writing it) is dropped and its image predicted again.
* ``predictions.json``: COCO detection results, ``[{image_id, file_name, category_id,
  category_name, bbox: [x, y, w, h], score}]``, with ``images.json`` beside it (the images'
  ids, files and sizes, and the categories, as a COCO file without annotations), so that
  ``COCO("images.json").loadRes("predictions.json")`` loads them; both assembled from the
  JSON-lines file at the end.
* ``predictions.csv``: ``image_path, xmin, ymin, xmax, ymax, label, score`` (deepforest's
  columns), pixels of the original image; rows appended and synced per image (rebuilt from
  the JSON-lines file when a job resumes, so an image in flight leaves no rows).
* ``images/``: each image with its detections drawn by Detectron2's ``Visualizer``, as JPEG,
  under its path relative to the inputs' common folder; images with a side above
  ``DRAW_MAX_SIDE`` are drawn reduced by a whole factor.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from detectron2.data import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..run_folder import ClassInfo
from ..utils.io import atomic_write_json, atomic_write_text

__all__ = ["OUTPUTS", "PredictionWriter", "read_records"]

logger = logging.getLogger(__name__)

OUTPUTS = ("json", "csv", "images")
JOBS_FILE = "predictions.jsonl"
RESULTS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
CSV_FILE = "predictions.csv"
DRAWN_DIR = "images"
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")
JPEG_QUALITY = 90
DRAW_MAX_SIDE = 4096  # larger images are drawn reduced (a full-size drawing costs ~10x memory)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The complete lines of a JSON-lines job file (none if it does not exist). A last line
    without its newline (written when the job was killed) is cut off the file."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        logger.warning(
            "%s: ignoring its half-written last line (the image in flight when the job "
            "stopped; it is predicted again)",
            path,
        )
        os.truncate(path, complete)
    return [json.loads(line) for line in data[:complete].splitlines() if line.strip()]


def _append(f, text: str) -> None:
    """Append ``text`` to the open file ``f`` and put it on disk."""
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _csv_text(rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


class PredictionWriter:
    """Writes each image's detections as it is added; continues the job that the output
    folder's ``predictions.jsonl`` holds (:attr:`done`). :meth:`close` writes the COCO
    files. The JSON-lines file is always written; ``outputs`` chooses the others.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        classes: ClassInfo,
        outputs: tuple[str, ...] = OUTPUTS,
        input_root: str | os.PathLike = "",
    ) -> None:
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)} (known: {', '.join(OUTPUTS)})")
        self.output_dir = Path(output_dir)
        self.classes = classes
        self.outputs = tuple(outputs)
        self.input_root = Path(input_root)
        self._metadata = Metadata(name="predict", thing_classes=list(classes.names))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.records = read_records(self.output_dir / JOBS_FILE)
        self._drawn = {self.output_dir / r["drawn"] for r in self.records if r["drawn"]}
        self._csv = None
        if "csv" in self.outputs:
            rows = [row for r in self.records for row in self._csv_rows(r)]
            atomic_write_text(self.output_dir / CSV_FILE, _csv_text([list(CSV_COLUMNS), *rows]))
            self._csv = open(self.output_dir / CSV_FILE, "a", newline="", encoding="utf-8")
        self._jsonl = open(self.output_dir / JOBS_FILE, "a", encoding="utf-8")

    @property
    def done(self) -> set[str]:
        """The files whose detections are written."""
        return {r["file_name"] for r in self.records}

    @staticmethod
    def _csv_rows(record: dict) -> list[list]:
        rows = []
        for d in record["detections"]:
            x, y, w, h = d["bbox"]
            row = [x, y, round(x + w, 2), round(y + h, 2), d["category_name"], d["score"]]
            rows.append([record["file_name"], *row])
        return rows

    def add(self, file_name: str, image: Image.Image, instances: Instances, tiles: int = 1) -> dict:
        """Write the detections of one image (``instances`` in its pixels; ``image`` RGB, for
        its size and the drawing) to every output; return its JSON-lines record."""
        detections = []
        boxes = instances.pred_boxes.tensor.tolist()
        for box, score, cls in zip(
            boxes, instances.scores.tolist(), instances.pred_classes.tolist()
        ):
            x0, y0, x1, y1 = (round(v, 2) for v in box)
            detections.append(
                {
                    "category_id": self.classes.category_id(cls),
                    "category_name": self.classes.name(cls),
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(score, 5),
                }
            )
        drawn = self._draw(file_name, image, instances) if "images" in self.outputs else None
        record = {
            "file_name": file_name,
            "width": image.width,
            "height": image.height,
            "tiles": tiles,
            "drawn": drawn,
            "detections": detections,
        }
        if self._csv is not None:
            _append(self._csv, _csv_text(self._csv_rows(record)))
        _append(self._jsonl, json.dumps(record) + "\n")  # the image is done once this is
        self.records.append(record)
        return record

    def _drawn_path(self, file_name: str) -> Path:
        path = Path(os.path.abspath(file_name))
        try:
            relative = path.relative_to(os.path.abspath(self.input_root))
        except ValueError:
            relative = Path(path.name)
        stem = self.output_dir / DRAWN_DIR / relative.with_suffix("")
        out, n = stem.with_suffix(".jpg"), 0
        while out in self._drawn:  # e.g. a.png and a.tif in one folder
            n += 1
            out = stem.with_name(f"{stem.name}-{n}.jpg")
        self._drawn.add(out)
        return out

    def _draw(self, file_name: str, image: Image.Image, instances: Instances) -> str:
        """Draw the detections on the image (reduced if large); return the drawing's path
        relative to the output folder."""
        factor = math.ceil(max(image.size) / DRAW_MAX_SIDE)
        if factor > 1:
            image = image.reduce(factor)
            instances = Instances(
                (image.height, image.width),
                pred_boxes=instances.pred_boxes.clone(),
                scores=instances.scores,
                pred_classes=instances.pred_classes,
            )
            instances.pred_boxes.scale(1 / factor, 1 / factor)
        vis = Visualizer(np.asarray(image), metadata=self._metadata)
        drawn = vis.draw_instance_predictions(instances.to("cpu")).get_image()
        path = self._drawn_path(file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(drawn).save(path, quality=JPEG_QUALITY)
        return path.relative_to(self.output_dir).as_posix()

    def close(self) -> list[Path]:
        """Close the appended files and write the COCO files from every image done; return
        the files written."""
        self._jsonl.close()
        written = [self.output_dir / JOBS_FILE]
        if self._csv is not None:
            self._csv.close()
            written.append(self.output_dir / CSV_FILE)
        if "json" in self.outputs:
            images, results = [], []
            for image_id, record in enumerate(self.records, start=1):
                file_name = record["file_name"]
                size = {"width": record["width"], "height": record["height"]}
                images.append({"id": image_id, "file_name": file_name, **size})
                results += [
                    {"image_id": image_id, "file_name": file_name, **d}
                    for d in record["detections"]
                ]
            categories = [
                {"id": self.classes.category_id(i), "name": name}
                for i, name in enumerate(self.classes.names)
            ]
            if not categories:  # classes named by index: list those that were predicted
                ids = sorted({r["category_id"] for r in results})
                categories = [{"id": i, "name": str(i)} for i in ids]
            coco = {"images": images, "annotations": [], "categories": categories}
            atomic_write_json(self.output_dir / IMAGES_FILE, coco)
            atomic_write_json(self.output_dir / RESULTS_FILE, results)
            written += [self.output_dir / RESULTS_FILE, self.output_dir / IMAGES_FILE]
        return written
