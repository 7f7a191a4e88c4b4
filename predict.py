#!/usr/bin/env python
"""Predict with a trained model on image files, folders and globs; large images are tiled.

Takes a finished run folder (--run OUTPUT_DIR of train_net.py; with --phase, the final model of
one of its finished phases), a config file with weights, or an export folder of
tools/export_model.py (--model: its TorchScript or ONNX model), and writes COCO results JSON, a
CSV with one box per row and images with the detections drawn. Each image's detections are
written as it finishes (predictions.jsonl): a rerun of the same command continues after the
images done; other settings on the same --output are refused unless --overwrite.
An image larger than the tile size (default: the last phase's test size) is predicted on
overlapping tiles whose boxes are mapped back and merged. Unreadable files are reported by
name and skipped.

Examples:
    python predict.py --run output/demo --input photos/ --output output/demo/predictions
    python predict.py --run output/demo --input "ortho/*.tif" --output preds \
        --tile-overlap 96 --confidence-threshold 0.3 --opts MODEL.DEVICE cpu
    python predict.py --run output/demo --phase PRETRAIN --input photos/ --output preds
    python predict.py --config-file output/demo/config_predict.yaml --input a.png \
        --output preds --opts MODEL.WEIGHTS output/demo/model_final.pth
    python predict.py --model output/demo/export_ts --input photos/ --output preds
    python predict.py --run output/demo --input big.tif --output preds --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

# Known, harmless deprecation noise from detectron2 v0.6 on recent torch.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402

from direct_pretrain.predict import (  # noqa: E402
    DEFAULT_SCORE_THRESHOLD,
    OUTPUTS,
    ExportedPredictor,
    PredictionWriter,
    Predictor,
    class_info,
    file_identity,
    inference_size,
    list_images,
    load_predict_config,
    load_run,
    overlap_pixels,
    predict_images,
    run_score_threshold,
    start_job,
)
from direct_pretrain.utils.errors import UserError, stop  # noqa: E402
from direct_pretrain.utils.io import atomic_write_json, ensure_writable_dir  # noqa: E402
from direct_pretrain.utils.logger import setup_project_logger  # noqa: E402

SUMMARY_FILE = "summary.json"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", metavar="OUTPUT_DIR", help="a finished run folder of train_net.py")
    model.add_argument(
        "--config-file",
        metavar="FILE",
        help="a config (a run's config_predict.yaml or phase_config.yaml, a training config, "
        "or a plain Detectron2 config); weights from MODEL.WEIGHTS",
    )
    model.add_argument(
        "--model",
        metavar="EXPORT_DIR",
        help="an export folder of tools/export_model.py (TorchScript or ONNX model, export.json)",
    )
    parser.add_argument(
        "--phase",
        metavar="NAME",
        help="with --run: predict with the final model of this finished phase "
        "(OUTPUT_DIR/<phase>/model_final.pth) instead of the run's",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders and glob patterns"
    )
    parser.add_argument("--output", required=True, help="folder for the outputs and log.txt")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        help="minimum score of the detections written (default: with --run, the score "
        f"threshold that maximised F1 on the run's test set if it saved one, else "
        f"{DEFAULT_SCORE_THRESHOLD})",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile side in pixels for images larger than it (default: the model's test size "
        "MIN_SIZE_TEST; 0: predict whole images at the model's test resize)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        help="overlap of neighbouring tiles: below 1 a fraction of the tile size, else pixels "
        "(default: 0.25); make it at least as large as the objects",
    )
    parser.add_argument(
        "--nms-threshold",
        type=float,
        default=0.5,
        help="IoU of the class-wise NMS that merges detections across tiles (default: 0.5)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="tiles of an image per forward pass (default: 1; not with --model)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the predictions in --output made with other settings (default: refuse "
        "them; the same settings continue the job)",
    )
    parser.add_argument(
        "--save",
        nargs="+",
        choices=OUTPUTS,
        default=list(OUTPUTS),
        help="outputs to write (default: all)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides at the end: KEY VALUE pairs (LazyConfig runs: a.b=c)",
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.phase and not args.run:
        raise ValueError("--phase needs --run (the run folder whose phase to predict with)")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: give at least 1 tile per forward pass")
    if args.model and args.batch > 1:
        raise ValueError(
            f"--batch {args.batch} with --model: an exported model takes one image per call "
            "(it was traced on one image); use --batch 1, or --run for batches"
        )
    ensure_writable_dir(args.output, "--output")
    setup_logger(args.output, name="detectron2")
    logger = setup_project_logger(args.output)
    Image.MAX_IMAGE_PIXELS = None  # large orthophotos are what tiling is for
    files = list_images(args.input)
    if args.model:
        if args.opts:
            raise ValueError("--opts does not apply to --model (an exported model)")
        predictor = ExportedPredictor(args.model)
        min_size, max_size = predictor.size
        classes, source = predictor.classes, predictor.model_file
    else:
        if args.run:
            cfg = load_run(args.run, args.opts, phase=args.phase)
            folder = args.run
        else:
            cfg = load_predict_config(args.config_file, opts=args.opts)
            folder = os.path.dirname(os.path.abspath(args.config_file))
        min_size, max_size = inference_size(cfg)
        predictor = Predictor(cfg)
        classes = class_info(cfg, folder)
        source = cfg.MODEL.WEIGHTS if hasattr(cfg, "MODEL") else cfg.train.init_checkpoint
    tile = args.tile_size if args.tile_size is not None else max(min_size, 0)
    overlap = overlap_pixels(tile, args.tile_overlap) if tile > 0 else 0
    threshold, why = args.confidence_threshold, "--confidence-threshold"
    if threshold is None:
        saved = run_score_threshold(args.run, args.phase) if args.run else None
        threshold, why = saved or (DEFAULT_SCORE_THRESHOLD, "default")
    settings = {
        "model": file_identity(source),
        "config_file": os.path.abspath(args.config_file) if args.config_file else None,
        "phase": args.phase.upper() if args.phase else None,
        "opts": list(args.opts),
        "score_threshold": threshold,
        "test_size": [min_size, max_size],
        "tile_size": tile,
        "tile_overlap_px": overlap,
        "nms_threshold": args.nms_threshold,
        "outputs": sorted(args.save),
    }
    start_job(args.output, settings, args.overwrite)
    logger.info("score threshold %.3g (%s)", threshold, why)
    logger.info(
        "Predicting on %d image file(s) with %s; test size %d (max %d); %s%s",
        len(files),
        source,
        min_size,
        max_size,
        f"tiles {tile} px, overlap {overlap} px" if tile > 0 else "no tiling",
        f", {args.batch} tiles per forward pass" if args.batch > 1 else "",
    )
    writer = PredictionWriter(
        args.output,
        classes,
        tuple(args.save),
        os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]),
    )
    summary = predict_images(
        predictor,
        files,
        writer,
        tile,
        overlap,
        nms_thresh=args.nms_threshold,
        score_thresh=threshold,
        batch=args.batch,
    )
    atomic_write_json(os.path.join(args.output, SUMMARY_FILE), summary)
    logger.info("Outputs in %s: %s", args.output, json.dumps(sorted(args.save)))
    return summary


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except UserError as e:  # a refusal: its message says what to do; no traceback
        stop(e)
