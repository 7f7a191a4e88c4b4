#!/usr/bin/env python
"""Peak memory of tiled prediction on one large image against the image's decoded size.

A child process loads the model, predicts once on a small image (model and tile working
memory), restarts its peak-memory counter (``/proc/self/clear_refs``) and predicts on the
large image (``predict_images``: decode once, cut tiles, merge, write JSON and CSV). The peak
resident memory above the resident memory before is compared with the decoded image's bytes
(width x height x 3). Linux only. Without ``--run`` it trains the short run of
predict_throughput.py.

    python benchmarks/large_image.py [--run OUTPUT_DIR] [--side 20000] [--tile 2048]
        [--draw] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import machine, predict_run, save_json, table

CHILD = """
import json, sys, time
from PIL import Image
from direct_pretrain.predict import PredictionWriter, Predictor, class_info, load_run
from direct_pretrain.predict import overlap_pixels, predict_images

run, small, large, out, tile, outputs = sys.argv[1:7]
Image.MAX_IMAGE_PIXELS = None  # a large orthophoto is no decompression bomb here
cfg = load_run(run, device="cpu")
predictor, classes = Predictor(cfg), class_info(cfg, run)
tile = int(tile)

def predict(path, folder):
    writer = PredictionWriter(folder, classes, tuple(outputs.split(",")))
    return predict_images(predictor, [path], writer, tile, overlap_pixels(tile, 0.25))

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024

predict(small, out + "/small")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the resident memory now
rss = status("VmRSS:")
summary = predict(large, out + "/large")
print(json.dumps({"rss": rss, "peak": status("VmHWM:"), "summary": summary}))
"""


def write_image(path: Path, side: int) -> None:
    """A ``side`` x ``side`` PNG with bright rectangles on a dark grid, drawn in strips."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (side, side), (30, 40, 30))
    strip = 1024
    for y in range(0, side, strip):
        h = min(strip, side - y)
        block = np.full((h, side, 3), 35, dtype=np.uint8)
        block[::64] = 90
        for _ in range(side // 40):
            bh, bw = rng.integers(10, 60, 2)
            by, bx = rng.integers(0, max(h - bh, 1)), rng.integers(0, side - bw)
            block[by : by + bh, bx : bx + bw] = rng.integers(150, 255, 3, dtype=np.uint8)
        image.paste(Image.fromarray(block), (0, y))
    image.save(path, compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished run (default: train a short one into --out)")
    parser.add_argument("--out", default="output/bench_predict", help="folder for the run")
    parser.add_argument("--side", type=int, default=20000, help="side of the square image, px")
    parser.add_argument(
        "--tile",
        type=int,
        default=2048,
        help="tile size, px (resized to the " "model's test size: the model's cost stays small)",
    )
    parser.add_argument("--draw", action="store_true", help="also draw the detections")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    run = predict_run(args.run, Path(args.out) / "run")
    outputs = "json,csv,images" if args.draw else "json,csv"
    with tempfile.TemporaryDirectory() as tmp:
        large, small = Path(tmp) / "large.png", Path(tmp) / "small.png"
        start = time.perf_counter()
        write_image(large, args.side)
        write_image(small, min(args.side, args.tile + args.tile // 2))
        print(
            f"wrote {large.stat().st_size / 2**20:.0f} MiB PNG in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        command = [sys.executable, "-c", CHILD, str(run), str(small), str(large), tmp]
        done = subprocess.run(
            [*command, str(args.tile), outputs], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    decoded = args.side * args.side * 3
    increase = figures["peak"] - figures["rss"]
    summary = figures["summary"]
    print(
        f"\n{machine()}\n{run}: {args.side}x{args.side} PNG, tiles {args.tile} px, outputs "
        f"{outputs}\n"
    )
    print(
        table(
            [
                "image",
                "decoded MB",
                "tiles",
                "seconds",
                "RSS before MB",
                "peak RSS MB",
                "peak increase MB",
                "peak increase / decoded bytes",
            ],
            [
                [
                    f"{args.side}x{args.side}",
                    round(decoded / 1e6),
                    summary["tiles"],
                    summary["seconds"],
                    round(figures["rss"] / 1e6),
                    round(figures["peak"] / 1e6),
                    round(increase / 1e6),
                    f"{increase / decoded:.2f}",
                ]
            ],
        )
    )
    save_json(
        args.json,
        {
            "machine": machine(),
            "side": args.side,
            "tile": args.tile,
            "decoded_bytes": decoded,
            **figures,
        },
    )


if __name__ == "__main__":
    main()
