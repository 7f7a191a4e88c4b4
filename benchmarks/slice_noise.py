#!/usr/bin/env python
"""Slice noise: how far a run's validation slice can be trusted to choose its final model.

For each run folder, the box AP of the pre-trained and fine-tuned models on the slice (from the
detections the run saved in ``<phase>/val_slice/inference``), their difference and its paired
jackknife standard error over the slice's images (``final_choice.paired_jackknife``, the test
the run's final choice makes).

    python benchmarks/slice_noise.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from direct_pretrain.final_choice import paired_jackknife, slice_detections
from direct_pretrain.run_folder import VAL_SLICE_JSON

from common import table

PHASES = ("pretrain", "finetune")


def slice_noise(run: str) -> list:
    """[run, images, pre-train AP, fine-tune AP, difference, jackknife SE, z]."""
    gt = Path(run) / VAL_SLICE_JSON
    found = [str(slice_detections(Path(run) / phase)) for phase in PHASES]
    pretrain, finetune, se = paired_jackknife(str(gt), *found)
    n = len(json.loads(gt.read_text())["images"])
    diff = pretrain - finetune
    return [
        run,
        n,
        round(pretrain, 1),
        round(finetune, 1),
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
