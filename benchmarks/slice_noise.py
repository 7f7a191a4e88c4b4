#!/usr/bin/env python
"""Slice noise: how far a run's validation slice can be trusted to choose its final model.

For each run folder, the box AP of the pre-trained and fine-tuned models on the slice (from the
detections the run saved in ``<phase>/val_slice/inference``), their difference and its paired
jackknife standard error over the slice's images (``final_choice.paired_jackknife``, the test
the run's final choice makes). With ``--test-json`` (the test set's COCO json, which every run
evaluated in ``<phase>/inference``) the same on the test set, and how far the slice's difference
lies from the test set's in standard errors of the two together: the slice's noise as the
jackknife sees it, against what the test set says.

    python benchmarks/slice_noise.py RUN [RUN ...] [--test-json TEST.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from direct_pretrain.final_choice import paired_jackknife, slice_detections
from direct_pretrain.run_folder import DETECTIONS_FILE, VAL_SLICE_JSON

from common import table

PHASES = ("pretrain", "finetune")


def slice_noise(run: str, test_json: str | None = None) -> list:
    """[run, images, pre-train AP, fine-tune AP, difference, jackknife SE, z]; with
    ``test_json``, then [test difference, its SE, slice minus test in SEs of both]."""
    gt = Path(run) / VAL_SLICE_JSON
    found = [str(slice_detections(Path(run) / phase)) for phase in PHASES]
    pretrain, finetune, se = paired_jackknife(str(gt), *found)
    n = len(json.loads(gt.read_text())["images"])
    diff = pretrain - finetune
    row = [run, n, round(pretrain, 1), round(finetune, 1), round(diff, 1), round(se, 1)]
    row.append(round(diff / se, 2) if se else "-")
    if test_json:
        tested = [str(Path(run) / phase / "inference" / DETECTIONS_FILE) for phase in PHASES]
        test_pretrain, test_finetune, test_se = paired_jackknife(test_json, *tested)
        test_diff = test_pretrain - test_finetune
        both = math.hypot(se, test_se)
        row += [round(test_diff, 1), round(test_se, 1)]
        row.append(round((diff - test_diff) / both, 2) if both else "-")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of planned runs (with a slice)")
    parser.add_argument("--test-json", help="the test set's COCO json (adds the test columns)")
    args = parser.parse_args()
    headers = ["run", "slice images", "pre-train AP", "fine-tune AP", "difference", "SE", "z"]
    if args.test_json:
        headers += ["test difference", "test SE", "slice - test (SEs)"]
    print(table(headers, [slice_noise(run, args.test_json) for run in args.runs]))


if __name__ == "__main__":
    main()
