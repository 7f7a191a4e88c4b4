"""Never end worse: the run's final model is chosen among its detector phases on a validation
slice carved from the training set, never on the test sets.

:func:`hold_out_val_slice` carves the slice (:mod:`.data.val_slice`) and trains every phase
without it; :func:`choose_final_phase` evaluates each detector phase's final model on it, with
that phase's own test settings (:func:`evaluate_on_slice`, cached in the phase folder), and keeps
the last phase unless an earlier one scores a higher box AP there by more than ``SLICE_Z``
standard errors of the difference (:func:`paired_jackknife` over the slice's images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.utils import comm
from pycocotools.coco import COCO

from .bridge import load_weights_strictly
from .checkpoint import checksum_path
from .config_systems import ConfigSystem
from .data.box_ap import box_ap
from .data.val_slice import (
    MIN_TRAIN_IMAGES,
    ValSlice,
    carve_val_slice,
    slice_of,
    write_slice_json,
)
from .engine import evaluate
from .phase_kinds import phase_kind
from .run_folder import (
    DETECTIONS_FILE,
    FINAL_MODEL,
    VAL_SLICE_DIR,
    VAL_SLICE_EVAL_FILE,
    VAL_SLICE_JSON,
)
from .utils.dist import build_on_main
from .utils.io import atomic_write_json, file_signature

__all__ = [
    "FinalChoice",
    "SliceScorer",
    "choose_final_phase",
    "evaluate_on_slice",
    "hold_out_val_slice",
    "paired_jackknife",
    "slice_detections",
]

logger = logging.getLogger(__name__)

# An earlier phase replaces the last one as the run's final model only when it scores a higher
# box AP on the slice by more than this many standard errors (paired jackknife over the slice's
# images). The plan study's 256-px tiles: with a "within 90% of the AP" rule the 10-image slice
# chose the pre-trained model on 2 of 8 seeds, 1.9 and 5.2 AP worse on the test tiles than the
# fine-tuned one, at 2.46 and 0.74 standard errors; the fine-tune led on the test tiles on all
# 8 (BENCHMARKS.md section 7).
SLICE_Z = 2.0


@dataclasses.dataclass(frozen=True)
class FinalChoice:
    """The phase whose final model is the run's, and what ``summary.json`` records of it."""

    phase: str
    val_slice: dict | None  # the slice, each phase's box AP on it and the evaluation seconds
    warnings: list[str]


def hold_out_val_slice(
    system: ConfigSystem, cfg, num_images: int
) -> tuple[Any, int, ValSlice | None]:
    """Carve the validation slice out of the training set (``DIRECT_PRETRAIN.VAL_SLICE``),
    register it in this process (call it in every process) and write its COCO json.

    Returns:
        The config training on the datasets without the slice, their number of images, and
        the slice; ``cfg``, ``num_images`` and None where there is none (said in the log).
    """
    node = cfg.DIRECT_PRETRAIN
    fraction, max_images = float(node.VAL_SLICE), int(node.VAL_SLICE_MAX_IMAGES)
    if not 0 <= fraction < 1 or max_images < 0:
        raise ValueError(
            f"DIRECT_PRETRAIN.VAL_SLICE = {fraction} must be in [0, 1) and VAL_SLICE_MAX_IMAGES "
            f"= {max_images} at least 0 (either 0: no validation slice)"
        )
    if fraction == 0 or max_images == 0:
        logger.info(
            "No validation slice (DIRECT_PRETRAIN.VAL_SLICE %g, VAL_SLICE_MAX_IMAGES %d): the "
            "run's final model is its last phase's.",
            fraction,
            max_images,
        )
        return cfg, num_images, None
    if num_images < MIN_TRAIN_IMAGES:
        logger.info(
            "No validation slice: the training set has %d images, fewer than %d; the run's "
            "final model is its last phase's.",
            num_images,
            MIN_TRAIN_IMAGES,
        )
        return cfg, num_images, None
    train_names = system.split_names(cfg)[0]
    json_file = os.path.join(system.output_dir(cfg), VAL_SLICE_JSON)
    dicts = system.train_dicts(cfg)
    val_slice = carve_val_slice(train_names, dicts, fraction, max_images, json_file)
    build_on_main(
        lambda: write_slice_json(val_slice), "writing the validation slice", others_too=False
    )
    logger.info(
        "Validation slice: %d of %d training images held out (from %s) to choose the final "
        "model; DIRECT_PRETRAIN.VAL_SLICE 0 turns it off.",
        val_slice.images,
        val_slice.total,
        ", ".join(train_names),
    )
    reduced = system.with_train_names(cfg, list(val_slice.train_names))
    return reduced, num_images - val_slice.images, val_slice


def evaluate_on_slice(
    system: ConfigSystem,
    cfg,
    phase_name: str,
    weights: str,
    min_size_test: int | None = None,
    max_size_test: int | None = None,
) -> dict:
    """COCO results of ``weights`` on the validation slice held out of ``cfg``'s training set,
    with phase ``phase_name``'s test settings (its test size unless given).

    The evaluation writes into ``<phase folder>/val_slice/`` (``val_slice_<min>x<max>/`` at
    another test size). Call it in every process; the results are the main process's.
    """
    name = slice_of(system.split_names(cfg)[0])
    if name is None:
        raise ValueError("the config's training set has no validation slice held out of it")
    phase = system.resolve(cfg, phase_name)
    own = (phase.MIN_SIZE_TEST, phase.MAX_SIZE_TEST)
    size = (min_size_test or own[0], max_size_test or own[1])
    phase = dataclasses.replace(phase, MIN_SIZE_TEST=size[0], MAX_SIZE_TEST=size[1])
    pcfg = system.phase_config(cfg, phase, 1)  # the schedule does not change an evaluation
    folder = VAL_SLICE_DIR if size == own else f"{VAL_SLICE_DIR}_{size[0]}x{size[1]}"
    pcfg = system.for_evaluation(pcfg, name, os.path.join(system.output_dir(pcfg), folder))
    model = system.build_model(pcfg)
    load_weights_strictly(model, weights)
    return evaluate(pcfg, model)


@dataclasses.dataclass(frozen=True)
class SliceScorer:
    """Box AP of phase ``phase``'s model ``weights`` on the validation slice (of ``images``
    images) at a test size; called in every process, the main process's result."""

    system: ConfigSystem
    cfg: Any
    phase: str
    weights: str
    images: int

    def __call__(self, min_size_test: int, max_size_test: int) -> float | None:
        results = evaluate_on_slice(
            self.system, self.cfg, self.phase, self.weights, min_size_test, max_size_test
        )
        return comm.all_gather(_box_ap(results))[0]


def _model_key(weights: str) -> str:
    """What identifies the final model ``weights``: its recorded checksum, else size|mtime."""
    record = checksum_path(weights)
    return record.read_text().split()[0] if record.is_file() else file_signature(weights)


def _box_ap(results: dict) -> float | None:
    ap = (results.get("bbox") or {}).get("AP")
    return ap if isinstance(ap, (int, float)) and math.isfinite(ap) else None


def _slice_record(system: ConfigSystem, cfg, name: str, val_slice: ValSlice) -> tuple[dict, bool]:
    """Phase ``name``'s final model evaluated on the slice, from ``val_slice_eval.json`` in its
    folder where that holds this model on this slice (and whether it did), else evaluated
    now and saved there (atomically: an interrupted evaluation is redone)."""
    phase = system.resolve(cfg, name)
    folder = Path(system.output_dir(cfg)) / phase.folder
    weights = str(folder / FINAL_MODEL)
    key = {
        "dataset": val_slice.name,
        "model": _model_key(weights),
        "min_size_test": phase.MIN_SIZE_TEST,
        "max_size_test": phase.MAX_SIZE_TEST,
    }
    cached = None
    if comm.is_main_process() and (folder / VAL_SLICE_EVAL_FILE).is_file():
        saved = json.loads((folder / VAL_SLICE_EVAL_FILE).read_text())
        cached = saved if {k: saved.get(k) for k in key} == key else None
    cached = comm.all_gather(cached)[0]
    if cached is not None:
        return cached, True
    start = time.perf_counter()
    results = evaluate_on_slice(system, cfg, name, weights)
    record = {**key, "results": results, "seconds": round(time.perf_counter() - start, 1)}
    record = comm.all_gather(record)[0]  # the main process's results
    if comm.is_main_process():
        atomic_write_json(folder / VAL_SLICE_EVAL_FILE, record)
    comm.synchronize()
    return record, False


def _ap_text(ap: float | None) -> str:
    return "nan" if ap is None else f"{ap:.1f}"


def choose_final_phase(
    system: ConfigSystem, cfg, names: list[str], val_slice: ValSlice | None
) -> FinalChoice:
    """The phase among ``names`` (the run's, in order, all finished) whose final model is the
    run's: the last one, unless an earlier detector phase scores a higher box AP on the
    validation slice by more than ``SLICE_Z`` standard errors, or the last one scores nothing
    (said loudly in the log and in the warnings). Call it in every process.

    ``cfg`` is the pipeline config training without the slice (:func:`hold_out_val_slice`).
    Without a slice, or with fewer than two detector phases ending in the last one, nothing is
    evaluated and the last phase's model is the run's.
    """
    last = names[-1]
    if val_slice is None:
        return FinalChoice(last, None, [])
    record = {
        "dataset": val_slice.name,
        "images": val_slice.images,
        "of": val_slice.total,
        "from": list(val_slice.sources),
        "file": VAL_SLICE_JSON,
        "box_ap": {},
        "eval_seconds": {},
        "reused": [],
    }
    detectors = [n for n in names if phase_kind(n).evaluates]
    if last not in detectors or len(detectors) < 2:
        return FinalChoice(last, record, [])
    for name in detectors:
        result, reused = _slice_record(system, cfg, name, val_slice)
        record["box_ap"][name] = _box_ap(result["results"])
        record["eval_seconds"][name] = result["seconds"]
        if reused:
            record["reused"].append(name)
        logger.info(
            "Phase %s on the validation slice (%d images): box AP %s (%s, %.1f s)",
            name,
            val_slice.images,
            _ap_text(record["box_ap"][name]),
            "saved earlier" if reused else "evaluated now",
            result["seconds"],
        )
    scores = record["box_ap"]
    earlier = [n for n in detectors[:-1] if scores[n] is not None]
    best = max(earlier, key=scores.get, default=None)
    if best is None or (scores[last] is not None and scores[last] >= scores[best]):
        return FinalChoice(last, record, [])
    z = None
    if scores[last] is not None:
        z = comm.all_gather(
            _slice_z(system, cfg, best, last, val_slice) if comm.is_main_process() else None
        )[0]
        record["z"] = None if z is None else round(z, 2)
    if scores[last] is not None and (z is None or z <= SLICE_Z):
        noise = (
            "the detections to test it are missing"
            if z is None
            else f"{_z_text(z, val_slice.images)}, within {SLICE_Z:g}: the slice's noise"
        )
        logger.info(
            "Phase %s scores %s on the validation slice against phase %s's %s (%s); the run's "
            "final model is the last phase's.",
            last,
            _ap_text(scores[last]),
            best,
            _ap_text(scores[best]),
            noise,
        )
        return FinalChoice(last, record, [])
    beyond = "" if z is None else f", {_z_text(z, val_slice.images)}"
    message = (
        f"Phase {last} ends below phase {best} on the validation slice (AP "
        f"{_ap_text(scores[last])} vs {_ap_text(scores[best])}{beyond}): the run's final model "
        f"is {best}'s (both kept in their folders)"
    )
    logger.warning(message)
    return FinalChoice(best, record, [message])


def _z_text(z: float, images: int) -> str:
    if math.isinf(z):
        return f"ahead on every leave-one-out of its {images} images by the same margin"
    return f"{z:.2f} standard errors of the paired jackknife over its {images} images"


def _slice_z(system: ConfigSystem, cfg, better: str, last: str, val_slice: ValSlice):
    """How many standard errors phase ``better`` leads phase ``last`` by on the slice, from
    the detections their slice evaluations wrote; None where they are missing."""
    root = Path(system.output_dir(cfg))
    found = [slice_detections(root / system.resolve(cfg, name).folder) for name in (better, last)]
    if not all(path.is_file() for path in found):
        return None
    better_ap, last_ap, error = paired_jackknife(val_slice.json_file, *map(str, found))
    difference = better_ap - last_ap
    if error == 0:
        return math.inf if difference > 0 else 0.0
    return difference / error


def slice_detections(phase_folder: str | os.PathLike) -> Path:
    """The detections a phase's final model made on the validation slice (the COCO results file
    Detectron2's COCOEvaluator writes under ``<phase folder>/val_slice``)."""
    return Path(phase_folder) / VAL_SLICE_DIR / "inference" / DETECTIONS_FILE


def _coco_ap(gt: COCO, detections: COCO | None, images: list[int]) -> float:
    """COCO box AP (x100) of ``detections`` on ``images`` of ``gt`` (0 without detections or
    objects)."""
    if detections is None:
        return 0.0
    ap = box_ap(gt, detections, images)["AP"]
    return 0.0 if math.isnan(ap) else ap


def paired_jackknife(
    gt_json: str, detections_a: str, detections_b: str
) -> tuple[float, float, float]:
    """Box APs of detections ``a`` and ``b`` (COCO results files) on the images of ``gt_json``,
    and the paired jackknife standard error of their difference (each image left out in turn,
    both models scored on the same images)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        detections = []
        for path in (detections_a, detections_b):
            with open(path) as f:
                results = json.load(f)
            detections.append(gt.loadRes(results) if results else None)
    images = sorted(gt.getImgIds())

    def difference(kept: list[int]) -> float:
        return _coco_ap(gt, detections[0], kept) - _coco_ap(gt, detections[1], kept)

    a, b = (_coco_ap(gt, d, images) for d in detections)
    n = len(images)
    if n < 2:
        return a, b, 0.0
    left_out = np.array([difference([j for j in images if j != i]) for i in images])
    return a, b, float(np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum()))
