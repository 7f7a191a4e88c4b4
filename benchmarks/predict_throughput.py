#!/usr/bin/env python
"""Prediction throughput: tiles/s of the project's predictor at batch 1, 4 and 8 (tiles of one
image per forward pass) against Detectron2's own ``DefaultPredictor`` on the same tiles, the
largest box and score differences from batch 1, and the time of ``predict_images`` on one
large image (tiled, merged, written) at each batch.

Without ``--run`` it trains a short demo-detector run first (8 iterations: 4.7 minutes on a
shared 2-core machine; reused afterwards) and, that model being untrained, keeps all its
detections (``MODEL.ROI_HEADS.SCORE_THRESH_TEST 0``), so that the comparison has boxes to
compare. Inputs are synthetic (dark with bright rectangles), on CPU unless ``--device cuda``.

    python benchmarks/predict_throughput.py [--run OUTPUT_DIR] [--image 1024] [--tiles 24]
        [--batches 1 4 8] [--json FILE] [--opts KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor
from PIL import Image

from direct_pretrain.predict import (
    PredictionWriter,
    Predictor,
    class_info,
    inference_size,
    load_run,
    overlap_pixels,
    predict_images,
    tile_windows,
)

from common import machine, predict_run, save_json, table


def synthetic_image(side: int, seed: int = 0) -> np.ndarray:
    """An RGB image with bright rectangles on a dark ground, objects every ~60 px."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
    for _ in range(side * side // 3600):
        h, w = rng.integers(10, 50, 2)
        y, x = rng.integers(0, side - h), rng.integers(0, side - w)
        image[y : y + h, x : x + w] = rng.integers(150, 255, 3, dtype=np.uint8)
    return image


def time_tiles(predict_batch, tiles: list[np.ndarray], batch: int) -> tuple[float, list]:
    """Seconds to predict ``tiles`` ``batch`` at a time (after one warm-up batch), and the
    Instances of each tile."""
    predict_batch(tiles[:batch])
    found = []
    start = time.perf_counter()
    for i in range(0, len(tiles), batch):
        found += predict_batch(tiles[i : i + batch])
    return time.perf_counter() - start, found


def largest_difference(reference: list, other: list) -> tuple[float, float]:
    """The largest box (px) and score difference between two predictions of the same tiles
    (inf where the detection counts or classes differ)."""
    box = score = 0.0
    for a, b in zip(reference, other):
        if len(a) != len(b) or not torch.equal(a.pred_classes, b.pred_classes):
            return float("inf"), float("inf")
        if len(a):
            box = max(box, float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()))
            score = max(score, float((a.scores - b.scores).abs().max()))
    return box, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished run (default: train a short one into --out)")
    parser.add_argument("--out", default="output/bench_predict", help="folder for the run")
    parser.add_argument("--image", type=int, default=1024, help="side of the large image")
    parser.add_argument("--tiles", type=int, default=24, help="tiles timed per setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args = parser.parse_args()

    run = predict_run(args.run, Path(args.out) / "run")
    opts = args.opts or ([] if args.run else ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0"])
    cfg = load_run(run, opts, device=args.device)
    predictor = Predictor(cfg)
    tile = inference_size(cfg)[0]
    overlap = overlap_pixels(tile, 0.25)
    image = synthetic_image(args.image)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    windows = tile_windows(args.image, args.image, tile, overlap)
    tiles = [np.ascontiguousarray(bgr[y0:y1, x0:x1]) for x0, y0, x1, y1 in windows]
    tiles = (tiles * (args.tiles // len(tiles) + 1))[: args.tiles]

    def ours(images):
        return [o["instances"].to("cpu") for o in predictor.predict_batch(images)]

    rows, results = [], {}
    reference = None
    if isinstance(cfg, CfgNode):  # DefaultPredictor takes yacs configs only
        d2 = DefaultPredictor(cfg)
        seconds, reference = time_tiles(lambda ims: [d2(ims[0])["instances"].to("cpu")], tiles, 1)
        boxes = sum(len(r) for r in reference)
        results["DefaultPredictor"] = {"tiles_per_s": len(tiles) / seconds, "boxes": boxes}
        rows.append(["Detectron2 DefaultPredictor", 1, len(tiles) / seconds, boxes, "-", "-", "-"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.png"
        Image.fromarray(image).save(path)
        for batch in args.batches:
            seconds, found = time_tiles(ours, tiles, batch)
            reference = reference or found
            box, score = largest_difference(reference, found)
            writer = PredictionWriter(Path(tmp) / f"out{batch}", class_info(cfg, run), ("json",))
            summary = predict_images(
                predictor, [str(path)], writer, tile, overlap, score_thresh=0.0, batch=batch
            )
            boxes = sum(len(r) for r in found)
            results[f"batch {batch}"] = {
                "tiles_per_s": len(tiles) / seconds,
                "boxes": boxes,
                "box_diff": box,
                "score_diff": score,
                "image_seconds": summary["seconds"],
                "image_tiles": summary["tiles"],
            }
            rows.append(
                [
                    "direct_pretrain Predictor",
                    batch,
                    len(tiles) / seconds,
                    boxes,
                    f"{box:.1e} / {score:.1e}",
                    summary["seconds"],
                    summary["tiles"],
                ]
            )
            print(f"batch {batch}: {len(tiles) / seconds:.2f} tiles/s", flush=True)
    print(
        f"\n{machine()}\n{run} {' '.join(opts)}: {tile} px tiles (the test size), "
        f"{len(tiles)} timed tiles; "
        f"whole image {args.image}x{args.image}, overlap {overlap} px, device {args.device}\n"
    )
    print(
        table(
            [
                "predictor",
                "tiles per pass",
                "tiles/s",
                "boxes on the timed tiles",
                "max box px / score diff vs the first row",
                f"whole {args.image}x{args.image} image s",
                "its tiles",
            ],
            rows,
        )
    )
    save_json(args.json, {"machine": machine(), "run": str(run), "results": results})


if __name__ == "__main__":
    main()
