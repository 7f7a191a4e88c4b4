"""Prediction outputs: COCO results JSON, a CSV with one box per row, drawn images.

* ``predictions.json``: COCO detection results, ``[{image_id, file_name, category_id,
  category_name, bbox: [x, y, w, h], score}]``, with ``images.json`` beside it (the images'
  ids, files and sizes, and the categories, as a COCO file without annotations), so that
  ``COCO("images.json").loadRes("predictions.json")`` loads them.
* ``predictions.csv``: ``image_path, xmin, ymin, xmax, ymax, label, score`` (deepforest's
  columns), pixels of the original image.
* ``images/``: each image with its detections drawn by Detectron2's ``Visualizer``, as JPEG,
  under its path relative to the inputs' common folder.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from detectron2.data import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..run_folder import ClassInfo
from ..utils.io import atomic_write_json, atomic_write_text

__all__ = ["OUTPUTS", "PredictionWriter"]

OUTPUTS = ("json", "csv", "images")
RESULTS_FILE = "predictions.json"
IMAGES_FILE = "images.json"
CSV_FILE = "predictions.csv"
DRAWN_DIR = "images"
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")
JPEG_QUALITY = 90


class PredictionWriter:
    """Collects each image's detections and writes the chosen outputs.

    Drawn images are written as each image is added; the JSON and CSV files by
    :meth:`close` (each written atomically).
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
        self.images: list[dict] = []
        self.results: list[dict] = []
        self.rows: list[list] = []  # CSV rows
        self._drawn: set[Path] = set()
        self._metadata = Metadata(name="predict", thing_classes=list(classes.names))

    def add(self, file_name: str, image_rgb: np.ndarray, instances: Instances) -> int:
        """Record the detections of one image (``instances`` in its pixels); return its id."""
        image_id = len(self.images) + 1
        height, width = image_rgb.shape[:2]
        self.images.append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height}
        )
        boxes = instances.pred_boxes.tensor.tolist()
        for box, score, cls in zip(
            boxes, instances.scores.tolist(), instances.pred_classes.tolist()
        ):
            x0, y0, x1, y1 = (round(v, 2) for v in box)
            name, score = self.classes.name(cls), round(score, 5)
            self.results.append(
                {
                    "image_id": image_id,
                    "file_name": file_name,
                    "category_id": self.classes.category_id(cls),
                    "category_name": name,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": score,
                }
            )
            self.rows.append([file_name, x0, y0, x1, y1, name, score])
        if "images" in self.outputs:
            self._draw(file_name, image_rgb, instances)
        return image_id

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

    def _draw(self, file_name: str, image_rgb: np.ndarray, instances: Instances) -> None:
        vis = Visualizer(image_rgb, metadata=self._metadata)
        drawn = vis.draw_instance_predictions(instances.to("cpu")).get_image()
        path = self._drawn_path(file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(drawn).save(path, quality=JPEG_QUALITY)

    def close(self) -> list[Path]:
        """Write the JSON and CSV outputs; return the files written."""
        written = []
        if "json" in self.outputs:
            categories = [
                {"id": self.classes.category_id(i), "name": name}
                for i, name in enumerate(self.classes.names)
            ]
            if not categories:  # classes named by index: list those that were predicted
                ids = sorted({r["category_id"] for r in self.results})
                categories = [{"id": i, "name": str(i)} for i in ids]
            images = {"images": self.images, "annotations": [], "categories": categories}
            atomic_write_json(self.output_dir / IMAGES_FILE, images)
            atomic_write_json(self.output_dir / RESULTS_FILE, self.results)
            written += [self.output_dir / RESULTS_FILE, self.output_dir / IMAGES_FILE]
        if "csv" in self.outputs:
            text = io.StringIO()
            rows = csv.writer(text, lineterminator="\n")
            rows.writerow(CSV_COLUMNS)
            rows.writerows(self.rows)
            atomic_write_text(self.output_dir / CSV_FILE, text.getvalue())
            written.append(self.output_dir / CSV_FILE)
        return written
