"""Export a run's detector to TorchScript or ONNX, check it against PyTorch, and predict with it.

The model is traced by Detectron2's ``TracingAdapter`` on CPU, in inference mode, on an image at
the run's test resize. The exported model takes one float32 CHW image (0-255, the run's input
format, already resized) and returns ``boxes`` (N x 4, x0 y0 x1 y1 in the resized image's
pixels), ``classes``, ``scores`` and ``image_size`` (height, width of its input); pixel
normalisation and padding are inside it. ``export.json`` beside it says the rest.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import nn

from ..config_systems import system_of
from ..data.images import read_image_checked
from ..predictor import Predictor, inference_size
from ..run_folder import ClassInfo
from ..utils.io import atomic_write_json, ensure_writable_dir
from .images import list_images

__all__ = [
    "BOX_TOLERANCE",
    "EXPORT_FORMATS",
    "EXPORT_INFO_FILE",
    "SCORE_TOLERANCE",
    "ExportError",
    "ExportMismatchError",
    "ExportedPredictor",
    "check_export",
    "check_images",
    "export_model",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXPORT_INFO_FILE = "export.json"
OUTPUT_NAMES = ("boxes", "classes", "scores", "image_size")
ONNX_OPSET = 17
# Largest differences the check accepts: boxes in pixels of the original image, scores.
BOX_TOLERANCE = 1e-3
SCORE_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported in the asked format."""


class ExportMismatchError(ExportError):
    """The exported model's predictions differ from the PyTorch model's."""


def _refusal(model: nn.Module) -> str:
    """Why ``model`` cannot be exported by this tool; "" if it can."""
    if isinstance(model, GeneralizedRCNN):
        heads = model.roi_heads
        extra = [n for n in ("mask_on", "keypoint_on") if getattr(heads, n, False)]
        if extra:
            return (
                f"{type(heads).__name__} has {' and '.join(extra)}: only box detectors export "
                "(prediction, tiles and the outputs use boxes; masks and keypoints are not "
                "checked). Export a Faster R-CNN (MODEL.MASK_ON False) instead"
            )
        return ""
    if isinstance(model, (RetinaNet, FCOS)):
        return ""
    return (
        f"{type(model).__name__} is not a detector this tool exports (Faster/Cascade R-CNN, "
        "RetinaNet, FCOS)"
    )


def _score_threshold(model: nn.Module) -> float:
    """The score below which Detectron2 drops detections inside the model."""
    if isinstance(model, GeneralizedRCNN):
        predictor = model.roi_heads.box_predictor
        predictor = predictor[-1] if isinstance(predictor, nn.ModuleList) else predictor
        return float(predictor.test_score_thresh)
    return float(model.test_score_thresh)


def _inference(model: nn.Module, inputs: list[dict]) -> list[dict]:
    """The model's detections in its input's pixels (no rescaling to an original size)."""
    if isinstance(model, GeneralizedRCNN):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    return model(inputs)


def _model_input(image: np.ndarray, resize: T.Augmentation, input_format: str) -> torch.Tensor:
    """A BGR image (HWC uint8) as the model takes it: input format, test resize, CHW float."""
    if input_format == "RGB":
        image = image[:, :, ::-1]
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))


def check_images(cfg, inputs: Sequence[str] = (), count: int = 8) -> list[np.ndarray]:
    """BGR images to trace on and check with: the first ``count`` of ``inputs`` (files, folders,
    globs), else of the run's test set if it is registered in this process, else none (the
    export then uses a sample image)."""
    if inputs:
        files = list_images(inputs)[:count]
    else:
        names = [n for n in system_of(cfg).split_names(cfg)[1] if n in DatasetCatalog.list()]
        files = [d["file_name"] for d in DatasetCatalog.get(names[0])[:count]] if names else []
    return [read_image_checked(f, "BGR") for f in files]


def _sample_image(size: int) -> np.ndarray:
    """A BGR image with bright rectangles, for tracing when no image is given."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    for _ in range(8):
        h, w = rng.integers(size // 8, size // 3, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        image[y : y + h, x : x + w] = rng.integers(150, 255, 3, dtype=np.uint8)
    return image


def export_model(
    cfg,
    classes: ClassInfo,
    fmt: str,
    output_dir: str | Path,
    images: Sequence[np.ndarray] = (),
) -> list[dict]:
    """Trace the config's model (CPU), write it with ``export.json`` and check it.

    Args:
        cfg: an inference config on CPU (``load_run(run, device="cpu")``).
        classes: the run's class names and category ids.
        fmt: "torchscript" or "onnx".
        output_dir: the export folder.
        images: BGR images (HWC uint8) to trace on (the first) and check on; default: a
            sample image at the test size.

    Returns:
        The check's rows (:func:`check_export`).

    Raises:
        ExportError: the model or format is not supported, naming why.
        ExportMismatchError: the exported model's predictions differ from PyTorch's.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown format '{fmt}' (known: {', '.join(EXPORT_FORMATS)})")
    predictor = Predictor(cfg)
    model = predictor.model
    if next(model.parameters()).device.type != "cpu":
        raise ExportError("export traces on CPU: load the run with device='cpu'")
    refusal = _refusal(model)
    if refusal:
        raise ExportError(f"cannot export {type(model).__name__}: {refusal}")
    min_size, max_size = inference_size(cfg)
    images = list(images) or [_sample_image(min_size)]
    image = _model_input(images[0], predictor.aug, predictor.input_format)
    adapter = TracingAdapter(model, [{"image": image}], _inference).eval()
    out = Path(output_dir)
    ensure_writable_dir(out, "--output")
    path = out / EXPORT_FORMATS[fmt]
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns of every Python value it fixes; the check below tests the result.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            if fmt == "torchscript":
                torch.jit.trace(adapter, (image,), check_trace=False).save(str(path))
            else:
                _export_onnx(adapter, image, path)
        except Exception as e:  # noqa: BLE001 - the exporter's reason is the message
            path.unlink(missing_ok=True)
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            raise ExportError(f"{fmt} export of {type(model).__name__} failed: {reason}") from e
    info = {
        "format": fmt,
        "model_file": path.name,
        "model_class": type(model).__name__,
        "input": "one float32 image tensor, 3 x H x W, values 0-255, resized as below",
        "input_format": predictor.input_format,
        "resize": {
            "short_side": min_size,
            "max_size": max_size,
            "how": "Detectron2 ResizeShortestEdge: short side to short_side, long side capped "
            "at max_size, bilinear (PIL)",
        },
        "pixel_normalisation_in_model": True,
        "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        "outputs": list(OUTPUT_NAMES),
        "outputs_meaning": "boxes: N x 4 x0 y0 x1 y1 in the input's (resized) pixels, scale "
        "by original/resized size; classes: N class indices; scores: N, decreasing; "
        "image_size: height, width of the input",
        "score_threshold": _score_threshold(model),
        "class_names": list(classes.names),
        "category_ids": list(classes.category_ids),
    }
    atomic_write_json(out / EXPORT_INFO_FILE, info)
    logger.info(
        "Exported %s to %s; checking it on %d image(s)", type(model).__name__, path, len(images)
    )
    try:
        return check_export(predictor, ExportedPredictor(out), images)
    except ExportMismatchError:
        (out / EXPORT_INFO_FILE).unlink()  # a failed export is no export folder
        raise


def _export_onnx(adapter: nn.Module, image: torch.Tensor, path: Path) -> None:
    """ONNX by the TorchScript-based exporter (``dynamo=False``: it traces as the TorchScript
    export does), image height and width dynamic."""
    torch.onnx.export(
        adapter,
        (image,),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={"image": {1: "height", 2: "width"}},
    )


class ExportedPredictor:
    """Predicts with an export folder as :class:`Predictor` does with the PyTorch model: one
    BGR image (HWC uint8) in, ``{"instances": Instances}`` in the image's pixels out."""

    def __init__(self, export_dir: str | Path) -> None:
        folder = Path(export_dir)
        info_file = folder / EXPORT_INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(
                f"{info_file} not found: '{folder}' is not an export folder of "
                "tools/export_model.py"
            )
        self.info = json.loads(info_file.read_text())
        self.model_file = str(folder / self.info["model_file"])
        if self.info["format"] == "torchscript":
            self._model = torch.jit.load(self.model_file, map_location="cpu")
        else:
            import onnxruntime  # only needed for ONNX exports

            self._session = onnxruntime.InferenceSession(self.model_file)
        resize = self.info["resize"]
        self.size = (int(resize["short_side"]), int(resize["max_size"]))  # test resize
        self.aug = T.ResizeShortestEdge([self.size[0]] * 2, self.size[1])
        self.classes = ClassInfo(tuple(self.info["class_names"]), tuple(self.info["category_ids"]))

    def _run(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.info["format"] == "torchscript":
            with torch.no_grad():
                return list(self._model(image))
        outputs = self._session.run(None, {"image": image.numpy()})
        return [torch.from_numpy(o) for o in outputs]

    def __call__(self, original_image: np.ndarray) -> dict:
        height, width = original_image.shape[:2]
        image = _model_input(original_image, self.aug, self.info["input_format"])
        boxes, classes, scores, _ = self._run(image)  # the last: image.shape[1:]
        instances = Instances(tuple(image.shape[1:]))
        instances.pred_boxes = Boxes(boxes)
        instances.pred_classes = classes.long()
        instances.scores = scores
        return {"instances": detector_postprocess(instances, height, width)}


def _compare(reference: Instances, exported: Instances, score_tolerance: float) -> dict:
    """Pair each reference detection (by decreasing score) with the exported one of the same
    class, a score within ``score_tolerance`` and the nearest box (detections of equal scores
    may come in either order); count the pairs and their largest box and score differences."""
    row = {"boxes": len(reference), "exported_boxes": len(exported), "matched": 0}
    row |= {"box_diff": 0.0, "score_diff": 0.0}
    if not len(reference) or not len(exported):
        return row
    boxes = reference.pred_boxes.tensor[:, None] - exported.pred_boxes.tensor[None]
    scores = (reference.scores[:, None] - exported.scores[None]).abs()
    same_class = reference.pred_classes[:, None] == exported.pred_classes[None]
    cost = torch.where(same_class & (scores <= score_tolerance), boxes.abs().amax(dim=2), torch.inf)
    for i in range(len(reference)):
        j = int(cost[i].argmin())
        if torch.isfinite(cost[i, j]):
            row["matched"] += 1
            row["box_diff"] = max(row["box_diff"], float(cost[i, j]))
            row["score_diff"] = max(row["score_diff"], float(scores[i, j]))
            cost[:, j] = torch.inf
    return row


def _table(rows: list[dict]) -> str:
    lines = ["image  boxes  exported  matched  max |box diff| px  max |score diff|"]
    for i, r in enumerate(rows):
        lines.append(
            f"{i:>5}  {r['boxes']:>5}  {r['exported_boxes']:>8}  {r['matched']:>7}  "
            f"{r['box_diff']:>17.2e}  {r['score_diff']:>16.2e}"
        )
    return "\n".join(lines)


def check_export(
    predictor: Predictor,
    exported: ExportedPredictor,
    images: Sequence[np.ndarray],
    box_tolerance: float = BOX_TOLERANCE,
    score_tolerance: float = SCORE_TOLERANCE,
) -> list[dict]:
    """Compare the exported model with the PyTorch model on ``images`` (BGR, HWC uint8).

    Each image must give the same number of detections, each paired with one of the same
    class, its box within ``box_tolerance`` pixels (of the image) and its score within
    ``score_tolerance``. The table is logged.

    Returns:
        One row per image: ``boxes``, ``exported_boxes``, ``matched`` (pairs),
        ``box_diff``, ``score_diff`` (the largest over the pairs).

    Raises:
        ExportMismatchError: with the table, if any image differs.
    """
    rows = [
        _compare(predictor(im)["instances"].to("cpu"), exported(im)["instances"], score_tolerance)
        for im in images
    ]
    table = _table(rows)
    logger.info(
        "Exported vs PyTorch model (tolerance: boxes %g px, scores %g):\n%s",
        box_tolerance,
        score_tolerance,
        table,
    )
    if not any(r["boxes"] for r in rows):
        logger.warning(
            "No check image gave a detection, so the check compared no box: give images the "
            "model detects objects on (tools/export_model.py --images)"
        )
    bad = [
        i
        for i, r in enumerate(rows)
        if not (
            r["boxes"] == r["exported_boxes"] == r["matched"] and r["box_diff"] <= box_tolerance
        )
    ]
    if bad:
        raise ExportMismatchError(
            f"the exported model differs from the PyTorch model on image(s) {bad} (tolerance: "
            f"the same detections and classes, boxes {box_tolerance} px, scores "
            f"{score_tolerance}):\n{table}"
        )
    return rows
