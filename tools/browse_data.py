#!/usr/bin/env python
"""See your data as the model sees it: draw the first training batches of a phase.

Loads a yacs config as ``train_net.py`` does (``KEY VALUE`` overrides), registers its datasets
and resolves its pixel statistics as the pipeline does, and draws the first batch(es) of each
phase's training loader after its resize, crop, flip and the model's padding, with the
ground-truth boxes and class names (``DIRECT_PRETRAIN.<PHASE>`` decides the augmentation and
resolution). Writes ``batches_<PHASE>.jpg`` into ``--output``, the image the pipeline also
writes into ``OUTPUT_DIR/report/`` before a phase trains. Trains nothing and writes nothing
into the run's ``OUTPUT_DIR``.

Usage:
    python tools/browse_data.py --config-file configs/trees/faster_rcnn_R_18_FPN_direct.yaml \\
        --phase PRETRAIN --output output/browse
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

# Known, harmless deprecation noise from detectron2 v0.6 on recent torch.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

from detectron2.utils.logger import setup_logger  # noqa: E402

from direct_pretrain.batches import draw_batches  # noqa: E402
from direct_pretrain.config_systems import load_config, system_of  # noqa: E402
from direct_pretrain.phases import active_phases  # noqa: E402
from direct_pretrain.pipeline import prepare_config  # noqa: E402


def main(args: argparse.Namespace) -> list[Path]:
    if args.config_file.endswith(".py"):
        sys.exit(
            f"browse_data.py: {args.config_file} is a LazyConfig; only yacs .yaml configs are "
            "supported."
        )
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="direct_pretrain")
    output = Path(args.output)
    # OUTPUT_DIR: the checks of prepare_config write there, not into the run's folder.
    cfg = load_config(args.config_file, [*args.opts, "OUTPUT_DIR", str(output)])
    system = system_of(cfg)
    cfg, num_images = prepare_config(cfg)
    phases = [args.phase] if args.phase else active_phases(cfg)
    paths = []
    for name in phases:
        pcfg = system.phase_config(cfg, system.resolve(cfg, name), num_images)
        paths.append(draw_batches(pcfg, output / f"batches_{name}.jpg", args.num_batches))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="a yacs pipeline config (.yaml)")
    parser.add_argument("--phase", help="one DIRECT_PRETRAIN phase (default: every active one)")
    parser.add_argument("--num-batches", type=int, default=1, help="batches per phase")
    parser.add_argument("--output", required=True, help="folder for batches_<PHASE>.jpg")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    main(parser.parse_args())
