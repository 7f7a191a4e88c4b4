#!/usr/bin/env python
"""The end of `make demo`: predict on one whole embedded orthophoto and add it to the report.

Runs ``predict.py`` (tiled prediction and merge) on a full-size source image of the embedded
tree-crown dataset (default: the 2299x2472 one) and compares, with pycocotools:

* the run's validation AP (held-out 256 px tiles; from ``summary.json``);
* the image cut into the dataset's 256 px tiles, each tile predicted alone against its tile
  annotations (crowns less than half inside a tile are ignored there, as in the dataset);
* the whole image, predicted by ``predict.py``, against all of its crowns.

Both predictions keep 300 RPN proposals per tile (``--opts``; the run evaluated with 1000):
on CPU this is 2.3x faster, at the same whole-image AP on the demo model (16.7 against 16.2,
measured). Writes ``report/whole_image.md`` (the table and the command),
``report/whole_image.json`` and ``report/whole_image.jpg`` (crowns in green, detections with
score >= 0.5 in red).

Usage:
    python tools/whole_image_demo.py --run output/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from direct_pretrain.data.images import read_image_checked
from direct_pretrain.data.trees import (
    SOURCES,
    TreeTile,
    deepforest_data_dir,
    make_tiles,
    read_voc_boxes,
    source_coco,
    split_tiles,
    tile_annotations,
    tile_origins,
)
from direct_pretrain.predict import Predictor, class_info, coco_box_ap, load_run
from direct_pretrain.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = "2019_YELL_2_528000_4978000_image_crop2"  # 2299x2472, 574 crowns
DATASET_TILE = 256  # the embedded dataset's tile size (build_neon_trees' default)
VAL_EVERY = 4  # and its validation split
DRAW_THRESHOLD = 0.5
DEFAULT_OPTS = ["MODEL.RPN.POST_NMS_TOPK_TEST", "300"]

logger = setup_logger(name="whole_image_demo", abbrev_name="demo")


def run_predict(
    run: Path, image: Path, output: Path, opts: list[str]
) -> tuple[str, dict, list[dict]]:
    """Run predict.py on ``image`` (all detections kept); return its command, summary and
    results."""
    command = [
        sys.executable,
        str(ROOT / "predict.py"),
        "--run",
        str(run),
        "--input",
        str(image),
        "--output",
        str(output),
        "--overwrite",
        "--confidence-threshold",
        "0",
        "--save",
        "json",
        "csv",
        *(["--opts", *opts] if opts else []),
    ]
    shown = shlex.join(["python", os.path.relpath(command[1]), *command[2:]])
    logger.info("Running: %s", shown)
    subprocess.run(command, check=True)
    summary = json.loads((output / "summary.json").read_text())
    return shown, summary, json.loads((output / "predictions.json").read_text())


def tile_level_ap(run: Path, stem: str, image_bgr: np.ndarray, opts: list[str]) -> tuple[dict, int]:
    """AP of the image cut into the dataset's tiles, each predicted alone; and the count."""
    cfg = load_run(run, opts)
    predict, classes = Predictor(cfg), class_info(cfg, run)
    boxes = read_voc_boxes(deepforest_data_dir() / f"{stem}.xml")
    height, width = image_bgr.shape[:2]
    side = min(DATASET_TILE, width, height)
    tiles = [
        TreeTile(stem, x, y, side)
        for y in tile_origins(height, side)
        for x in tile_origins(width, side)
    ]
    images, annotations, results = [], [], []
    for image_id, tile in enumerate(tiles, start=1):
        x0, y0, x1, y1 = tile.rect
        images.append({"id": image_id, "file_name": tile.file_name, "width": side, "height": side})
        for ann in tile_annotations(boxes, tile):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        instances = predict(np.ascontiguousarray(image_bgr[y0:y1, x0:x1]))["instances"].to("cpu")
        for box, score, cls in zip(
            instances.pred_boxes.tensor.tolist(),
            instances.scores.tolist(),
            instances.pred_classes.tolist(),
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": classes.category_id(cls),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in zip(classes.category_ids, classes.names)],
    }
    return coco_box_ap(gt, results), len(tiles)


def training_tiles(stem: str) -> int:
    """How many of the source's dataset tiles are training tiles."""
    data_dir = deepforest_data_dir()
    sizes = {}
    for s in SOURCES:
        with Image.open(data_dir / f"{s}.png") as image:
            sizes[s] = image.size
    train, _ = split_tiles(make_tiles(sizes, DATASET_TILE), VAL_EVERY)
    return sum(t.source == stem for t in train)


def draw(image_rgb: np.ndarray, gt: dict, results: list[dict], path: Path) -> None:
    """Crowns in green, detections with score >= DRAW_THRESHOLD in red."""

    def xyxy(boxes: list[list[float]]) -> np.ndarray:
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)

    vis = Visualizer(image_rgb)
    crowns = xyxy([a["bbox"] for a in gt["annotations"]])
    vis.overlay_instances(boxes=crowns, assigned_colors=[(0, 0.8, 0)] * len(crowns))
    found = xyxy([r["bbox"] for r in results if r["score"] >= DRAW_THRESHOLD])
    out = vis.overlay_instances(boxes=found, assigned_colors=[(0.9, 0, 0)] * len(found))
    Image.fromarray(out.get_image()).save(path, quality=90)


def row(name: str, ap: dict) -> str:
    return f"| {name} | " + " | ".join(f"{ap[k]:.1f}" for k in ("AP", "AP50", "AP75")) + " |"


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    report = run / "report"
    report.mkdir(parents=True, exist_ok=True)
    image_path, gt = source_coco(args.source)
    gt_file = run / "whole_image" / "annotations.json"
    atomic_write_json(gt_file, gt)
    command, speed, results = run_predict(run, image_path, run / "whole_image", args.opts)
    whole = coco_box_ap(gt, results, max_dets=max(100, len(results)))
    image_bgr = read_image_checked(str(image_path), "BGR")
    tiles_ap, num_tiles = tile_level_ap(run, args.source, image_bgr, args.opts)
    summary = json.loads((run / "summary.json").read_text())
    final = summary["phases"][summary.get("final_phase") or list(summary["phases"])[-1]]
    validation = {k: final.get(k, float("nan")) for k in ("AP", "AP50", "AP75")}
    height, width = image_bgr.shape[:2]
    crowns = len(gt["annotations"])
    train_tiles = training_tiles(args.source)
    draw(image_bgr[:, :, ::-1], gt, results, report / "whole_image.jpg")
    figures = {
        "source": args.source,
        "width": width,
        "height": height,
        "crowns": crowns,
        "validation_tiles": validation,
        "image_tiles": tiles_ap,
        "image_tiles_count": num_tiles,
        "image_training_tiles": train_tiles,
        "whole_image": whole,
        "predict": speed,
        "command": command,
        "opts": args.opts,
    }
    atomic_write_json(report / "whole_image.json", figures)
    table = "\n".join(
        [
            f"## Whole-image prediction: {args.source} ({width}x{height}, {crowns} crowns)",
            "",
            f"`{command}`",
            "",
            f"{speed['tiles']} tiles, {speed['seconds']:.1f} s on {summary.get('device')} "
            f"({speed['images_per_second']} images/s, {speed['tiles_per_second']} tiles/s, "
            "reading and writing included).",
            "",
            "| evaluation | box AP | AP50 | AP75 |",
            "|---|---|---|---|",
            row("validation tiles (held out; the run's AP, its own settings)", validation),
            row(
                f"this image in {num_tiles} tiles of {DATASET_TILE} px, each predicted alone "
                "(tile annotations)",
                tiles_ap,
            ),
            row(f"this image whole: tiled prediction + merge (all {crowns} crowns)", whole),
            "",
            f"{train_tiles} of this image's {num_tiles} dataset tiles are training tiles: the "
            "last two rows are not held-out results; they compare tile-by-tile and "
            "whole-image prediction on the same pixels, both with "
            f"`{' '.join(args.opts) or 'the run settings'}`.",
            "",
            f"![whole image](whole_image.jpg) crowns in green, detections with score >= "
            f"{DRAW_THRESHOLD} in red.",
            "",
        ]
    )
    atomic_write_text(report / "whole_image.md", table)
    logger.info("Whole-image prediction (report/whole_image.md):\n%s", table)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run folder on the trees data")
    parser.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"source image (one of {', '.join(SOURCES)})"
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=DEFAULT_OPTS,
        help=f"config overrides for both predictions (default: {' '.join(DEFAULT_OPTS)})",
    )
    main(parser.parse_args())
