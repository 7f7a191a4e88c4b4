#!/usr/bin/env python
"""Data loading: loader-only images/s of a phase's train loader, with and without the
low-resolution cache (RESIZED_CACHE), next to the model's training images/s.

The goal: the loader, with the configured workers, delivers at least twice the images/s the
model trains on, so it is never the bottleneck of the pre-train phase.

    python benchmarks/data_loading.py [--config-file CFG] [--embedded-tile 1024] [KEY VALUE ...]

``--embedded-tile N`` cuts the embedded tree images into N px tiles (full-size images, as a
user dataset would have) instead of the configured dataset.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

from direct_pretrain.config_systems import training_dicts
from direct_pretrain.data.datasets import cache_dir
from direct_pretrain.data.resized_cache import maybe_resized
from direct_pretrain.engine import DirectPretrainTrainer

from common import DEMO_CONFIG, machine, phase_cfg, save_json, table
from phase_cost import measure


def _embedded_opts(tile: int, config_file: str, opts: list[str]) -> list[str]:
    """Overrides that register the embedded dataset cut into ``tile`` px tiles."""
    from direct_pretrain.config_systems import load_config
    from direct_pretrain.data.trees import build_neon_trees

    node = load_config(config_file, opts).DIRECT_PRETRAIN
    json_file, images = build_neon_trees(cache_dir(node), tile=tile)["train"]
    name = f"neon_trees_{tile}_train"
    return [
        *opts,
        "DIRECT_PRETRAIN.REGISTER_COCO",
        repr([[name, json_file, images]]),
        "DATASETS.TRAIN",
        f"('{name}',)",
    ]


def loader_speed(
    config_file: str,
    opts: list[str],
    phase: str,
    cached: bool,
    workers: int,
    batches: int,
    warmup: int,
) -> dict:
    """Images/s of the phase's train loader alone (no model)."""
    cfg = phase_cfg(
        config_file,
        [*opts, "DATALOADER.NUM_WORKERS", str(workers)],
        phase,
        {"RESIZED_CACHE": cached},
    )
    start = time.perf_counter()
    node = cfg.DIRECT_PRETRAIN[phase]
    dicts = maybe_resized(training_dicts(cfg), node, cache_dir(cfg.DIRECT_PRETRAIN))
    build = time.perf_counter() - start
    loader = iter(DirectPretrainTrainer.build_train_loader(cfg))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    images = sum(len(next(loader)) for _ in range(batches))
    pixels = sum(d["height"] * d["width"] for d in dicts) / len(dicts)
    return {
        "images_per_s": images / (time.perf_counter() - start),
        "cache_seconds": build,
        "stored_pixels": pixels,
        "images": len(dicts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--phase", default="PRETRAIN")
    parser.add_argument("--workers", type=int, help="loader workers (default: the config's)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--embedded-tile", type=int, help="use the embedded images in N px tiles")
    parser.add_argument("--json")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    opts = list(args.opts)
    if args.embedded_tile:
        opts = _embedded_opts(args.embedded_tile, args.config_file, opts)
    workers = args.workers
    if workers is None:
        workers = phase_cfg(args.config_file, opts, args.phase).DATALOADER.NUM_WORKERS
    spawn = mp.get_context("spawn")
    results = {}
    for label, cached in (("original images", False), ("low-res cache", True)):
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            results[label] = pool.submit(
                loader_speed,
                args.config_file,
                opts,
                args.phase,
                cached,
                workers,
                args.batches,
                args.warmup,
            ).result()
        print(f"{label}: {results[label]['images_per_s']:.1f} images/s", flush=True)
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        model = pool.submit(measure, args.config_file, opts, args.phase, {}, 4, 2).result()
    model_ips = model["images_per_s"]
    rows = [
        [
            label,
            f"{r['stored_pixels'] ** 0.5:.0f}^2",
            r["images_per_s"],
            r["images_per_s"] / model_ips,
            f"{r['cache_seconds']:.1f}",
        ]
        for label, r in results.items()
    ]
    rows.append(["model (training)", model["size"], model_ips, 1.0, "-"])
    print(
        f"\n{machine()}\n{args.config_file}, phase {args.phase}, {workers} loader workers, "
        f"{results['original images']['images']} images\n"
    )
    print(table(["reading", "stored size (mean)", "images/s", "x model", "cache s"], rows))
    save_json(
        args.json,
        {
            "machine": machine(),
            "workers": workers,
            "loader": results,
            "model_images_per_s": model_ips,
        },
    )


if __name__ == "__main__":
    main()
