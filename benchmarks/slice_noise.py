#!/usr/bin/env python
"""Slice noise: how far a run's validation slice can be trusted to choose its final model.

For each run folder, the box AP of the pre-trained and fine-tuned models on the slice (from the
detections the run saved in ``<phase>/val_slice/inference``), their difference and its paired
jackknife standard error over the slice's images (each image left out in turn).

    python benchmarks/slice_noise.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common import table

PHASES = ("pretrain", "finetune")


def box_ap(gt: COCO, detections: COCO, images: list[int]) -> float:
    """COCO box AP (x100) of ``detections`` on ``images`` of ``gt``."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, detections, "bbox")
        evaluation.params.imgIds = images
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return 100 * float(evaluation.stats[0])


def slice_noise(run: str) -> list:
    """[run, images, pre-train AP, fine-tune AP, difference, jackknife SE, z]."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(f"{run}/val_slice_coco.json")
        found = [f"{run}/{p}/val_slice/inference/coco_instances_results.json" for p in PHASES]
        detections = [gt.loadRes(path) for path in found]
    images = sorted(gt.getImgIds())
    full = [box_ap(gt, d, images) for d in detections]

    def difference(kept: list[int]) -> float:
        return box_ap(gt, detections[0], kept) - box_ap(gt, detections[1], kept)

    left_out = np.array([difference([j for j in images if j != i]) for i in images])
    n = len(images)
    se = float(np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum()))
    diff = full[0] - full[1]
    return [
        run,
        n,
        round(full[0], 1),
        round(full[1], 1),
        round(diff, 1),
        round(se, 1),
        round(diff / se, 2) if se else "-",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of planned runs (with a slice)")
    args = parser.parse_args()
    headers = ["run", "slice images", "pre-train AP", "fine-tune AP", "difference", "SE", "z"]
    print(table(headers, [slice_noise(run) for run in args.runs]))


if __name__ == "__main__":
    main()
