"""What a finished run reports: the summary's per-phase results, the final model's F1-best score
threshold and confusion matrix, a warning when the last phase ends below an earlier one, and the
report (:mod:`.report`) with its figures."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from detectron2.data import MetadataCatalog

from .config_systems import ConfigSystem
from .confusion import confusion_matrix, plot_confusion
from .phases import Phase
from .predictor import Predictor
from .report import AP_KEYS, SIZE_KEYS, write_index, write_report
from .results import Matching, best_threshold, class_curves, curve, match_detections
from .run_folder import DETECTIONS_FILE, save_predict_threshold

__all__ = [
    "MATCH_IOU",
    "ap_text",
    "phase_results",
    "score_threshold_and_confusion",
    "worse_than_earlier",
    "write_run_report",
]

logger = logging.getLogger(__name__)

# IoU of a match for the F1-best score threshold and the precision-recall curves.
MATCH_IOU = 0.5


def _finite(value):
    """``value``, or None for NaN (as JSON keeps it)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def phase_results(record: dict) -> dict:
    """The record's box results for ``summary.json``: Detectron2's AP, AP50, AP75, APs, APm,
    APl, and with more than one class ``per_class``: {name: {AP, AP50, AP75}} (Detectron2's
    ``AP-<name>``, the evaluator's ``AP50-<name>`` and ``AP75-<name>``); NaN as None."""
    bbox = record.get("results", {}).get("bbox", {})
    out = {k: _finite(bbox[k]) for k in AP_KEYS + SIZE_KEYS if k in bbox}
    names = [k.removeprefix("AP-") for k in bbox if k.startswith("AP-")]
    if names:
        out["per_class"] = {
            name: {k: _finite(bbox[f"{k}-{name}"]) for k in AP_KEYS if f"{k}-{name}" in bbox}
            for name in names
        }
    return out


def ap_text(record: dict) -> str:
    """The record's final box AP for a log line (JSON keeps a NaN AP as null)."""
    bbox = phase_results(record)
    if "AP" not in bbox:
        return "not evaluated"
    return "box AP nan" if bbox["AP"] is None else f"box AP {bbox['AP']:.1f}"


def worse_than_earlier(phases: dict, test_names: list[str], final: str | None = None) -> list[str]:
    """A warning (logged, and kept in the summary) when the phase ``final`` (whose model is the
    run's; default the last) ends below another phase's box AP on the test sets: the run's
    final model is then not its best one there.

    Both were evaluated on the same test sets, each at its own phase's test size; choosing the
    final model by them would select on the test data, so the run keeps its final model (the
    last phase's, or the one the validation slice chose) and says where the better one is.
    """
    scored = {name: rec["AP"] for name, rec in phases.items() if rec.get("AP") is not None}
    last = list(phases)[-1] if phases else None
    final = final or last
    if final not in scored:
        return []
    best = max(scored, key=scored.get)
    if scored[best] <= scored[final]:
        return []
    if final == last:
        which = f"The last phase, {last},"
        hint = f"Check {last}'s settings (its size, LR and length) before trusting it."
    else:
        which = f"Phase {final}, chosen on the validation slice,"
        hint = (
            "The validation slice and the test sets disagree: a small slice judges noisily "
            "(DIRECT_PRETRAIN.VAL_SLICE, VAL_SLICE_MAX_IMAGES)."
        )
    message = (
        f"{which} ends below phase {best} on {', '.join(test_names)}: box AP "
        f"{scored[final]:.1f} against {scored[best]:.1f}. model_final.pth is the {final} model; "
        f"the {best} model is {best.lower()}/model_final.pth (predict.py --run OUTPUT_DIR "
        f"--phase {best}). {hint}"
    )
    logger.warning(message)
    return [message]


def _final_detections(system: ConfigSystem, pcfg, dataset: str) -> tuple[dict, list] | None:
    """The ground truth of ``dataset`` (its COCO json) and the detections of the phase's final
    evaluation (``inference/coco_instances_results.json`` in its folder, of its last test set);
    None where either is missing."""
    json_file = MetadataCatalog.get(dataset).get("json_file", None)
    detections = Path(system.output_dir(pcfg)) / "inference" / DETECTIONS_FILE
    if json_file is None or not detections.is_file():
        logger.info(
            "No score threshold nor confusion matrix: %s",
            f"{detections} not found" if json_file else f"dataset '{dataset}' has no COCO json",
        )
        return None
    return json.loads(Path(json_file).read_text()), json.loads(detections.read_text())


def score_threshold_and_confusion(
    system: ConfigSystem, output_dir: str, phase: Phase, pcfg
) -> tuple[Matching | None, dict | None]:
    """Match the final model's detections on its last test set (:mod:`.results`), save the score
    threshold that maximises F1 over all classes for ``predict.py --run`` (or remove an earlier
    run's, where there is none), and count the confusion matrix at it (:mod:`.confusion`).

    Returns:
        The matching and the confusion matrix, each None where there is none. A failure is
        logged, never fatal (the results are saved).
    """
    save_predict_threshold(output_dir, None)
    if not phase.KIND.evaluates:
        return None, None
    dataset = system.split_names(pcfg)[1][-1]
    try:
        found = _final_detections(system, pcfg, dataset)
        matching = None if found is None else match_detections(*found, MATCH_IOU)
    except Exception:  # noqa: BLE001 - an extra; the results are saved
        logger.exception("Could not match the final detections; no score threshold saved.")
        return None, None
    best = best_threshold(curve(matching)) if matching is not None else None
    if best is None:
        return matching, None
    threshold, f1 = best
    save_predict_threshold(
        output_dir,
        {
            "score_threshold": threshold,
            "f1": f1,
            "iou": MATCH_IOU,
            "dataset": dataset,
            "phase": phase.NAME,
        },
    )
    logger.info(
        "F1-best score threshold on %s (all classes, IoU %s): %.3g (F1 %.3f); predict.py "
        "--run uses it by default.",
        dataset,
        MATCH_IOU,
        threshold,
        f1,
    )
    return matching, confusion_matrix(*found, threshold)


def write_run_report(
    system: ConfigSystem,
    output_dir: str,
    phase: Phase,
    pcfg,
    summary: dict,
    records: dict,
    matching: Matching | None,
) -> None:
    """Write the run's report (with ``matching``, the final model's precision-recall and F1
    curves); a failure is logged, never fatal (the results are saved)."""
    try:
        pr_f1 = None
        if matching is not None:
            overall = curve(matching)
            pr_f1 = {
                "curves": class_curves(matching),
                "overall": overall,
                "threshold": best_threshold(overall),
                "iou": matching.iou,
            }
        predict = None
        if phase.KIND.evaluates:  # a detector
            predictor = Predictor(system.with_weights(pcfg, summary["final_model"]))
            rgb = system.image_format(pcfg) == "RGB"

            def predict(image):  # in the config's format, as the report reads images
                bgr = image[:, :, ::-1] if rgb else image
                return predictor(bgr)["instances"].to("cpu")

        write_report(
            output_dir,
            summary,
            records,
            predict,
            system.dataset_names(pcfg)[-1],
            system.image_format(pcfg),
            pr_f1,
        )
        report = Path(output_dir) / "report"
        if summary.get("confusion"):
            plot_confusion(summary["confusion"], report / "confusion.png")
        write_index(report, summary)
    except Exception:  # noqa: BLE001 - the report is an extra; training results are saved
        logger.exception("Could not write the report; the results above are saved.")
