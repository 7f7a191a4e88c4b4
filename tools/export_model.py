#!/usr/bin/env python
"""Export a finished run's detector to TorchScript or ONNX and check it against PyTorch.

Traces the run's final model (Faster/Cascade R-CNN, RetinaNet, FCOS) on CPU with Detectron2's
TracingAdapter, writes OUTPUT/model.ts or model.onnx with export.json (input format, test
resize, classes, outputs, score threshold), then runs the exported and the PyTorch model on the
check images and fails if they differ (same boxes and classes, boxes within 1e-3 px, scores
within 1e-4). ``predict.py --model OUTPUT`` predicts with the export.

Examples:
    python tools/export_model.py --run output/demo --format torchscript --output output/demo/ts
    python tools/export_model.py --run output/demo --format onnx --output export/onnx \
        --images photos/
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Known, harmless deprecation noise from detectron2 v0.6 on recent torch.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

from detectron2.utils.logger import setup_logger  # noqa: E402

from direct_pretrain.predict import (  # noqa: E402
    EXPORT_FORMATS,
    ExportError,
    check_images,
    class_info,
    export_model,
    load_run,
)
from direct_pretrain.utils.errors import UserError, stop  # noqa: E402
from direct_pretrain.utils.logger import setup_project_logger  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, metavar="OUTPUT_DIR", help="a finished run")
    parser.add_argument("--phase", metavar="NAME", help="export this finished phase's model")
    parser.add_argument("--format", required=True, choices=list(EXPORT_FORMATS))
    parser.add_argument("--output", required=True, help="the export folder")
    parser.add_argument(
        "--images",
        nargs="+",
        default=[],
        help="images (files, folders, globs) to trace on and check with; default: the run's "
        "test images if its dataset is registered, else a sample image at the test size",
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides at the end"
    )
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    setup_logger(args.output, name="detectron2")
    setup_project_logger(args.output)
    cfg = load_run(args.run, args.opts, device="cpu", phase=args.phase)
    return export_model(
        cfg, class_info(cfg, args.run), args.format, args.output, check_images(cfg, args.images)
    )


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ExportError as e:
        sys.exit(f"Export failed: {e}")
    except UserError as e:  # a refusal: its message says what to do; no traceback
        stop(e)
