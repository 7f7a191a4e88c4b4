"""Prediction with a finished run: loading it, tiled prediction on large images, outputs.

``load_run(run_dir)`` returns the config of a run's final model (``DefaultPredictor`` takes
it); ``predict.py`` at the repository root runs it on image files, folders and globs.
``export_model`` writes it as TorchScript or ONNX (``tools/export_model.py``) and
``ExportedPredictor`` predicts with that export. ``PredictionWriter`` writes each image's
outputs as it finishes and ``start_job`` keeps a rerun to the same settings.
"""

from ..predictor import Predictor, inference_size
from ..run_folder import ClassInfo, class_info
from .evaluate import coco_box_ap
from .export import (
    EXPORT_FORMATS,
    ExportedPredictor,
    ExportError,
    ExportMismatchError,
    check_export,
    check_images,
    export_model,
)
from .images import PillowBGR, list_images, predict_images
from .job import SETTINGS_FILE, SettingsMismatchError, file_identity, start_job
from .run import (
    DEFAULT_SCORE_THRESHOLD,
    UnfinishedPhaseError,
    load_predict_config,
    load_run,
    run_score_threshold,
)
from .tiling import merge_tile_predictions, overlap_pixels, predict_tiled, tile_windows
from .writers import OUTPUTS, PredictionWriter, read_records

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "EXPORT_FORMATS",
    "OUTPUTS",
    "SETTINGS_FILE",
    "ClassInfo",
    "ExportError",
    "ExportMismatchError",
    "ExportedPredictor",
    "PillowBGR",
    "PredictionWriter",
    "Predictor",
    "SettingsMismatchError",
    "UnfinishedPhaseError",
    "check_export",
    "check_images",
    "class_info",
    "coco_box_ap",
    "export_model",
    "file_identity",
    "inference_size",
    "list_images",
    "load_predict_config",
    "load_run",
    "merge_tile_predictions",
    "overlap_pixels",
    "predict_images",
    "predict_tiled",
    "read_records",
    "run_score_threshold",
    "start_job",
    "tile_windows",
]
