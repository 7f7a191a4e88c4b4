#!/usr/bin/env python
"""Phase cost: training images/s and peak memory of the pre-train and fine-tune settings of
one detector at the same batch, the speed-up against the pixel ratio of the two input sizes,
and where the time goes (backbone body, FPN, RPN, RoI heads, backward, optimizer step).

Each setting runs in a fresh process (so peak memory is its own) on batches drawn from the
phase's real train loader beforehand (loading is measured by data_loading.py).

    python benchmarks/phase_cost.py [--config-file CFG] [--batch 4] [--iters 6] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from direct_pretrain.engine import DirectPretrainTrainer

from common import DEMO_CONFIG, machine, peak_memory_mb, phase_cfg, save_json, table

# Model parts timed in the forward pass, by attribute path (absent ones are skipped).
PARTS = {
    "backbone body": "backbone.bottom_up",
    "backbone+FPN": "backbone",
    "RPN": "proposal_generator",
    "RoI heads": "roi_heads",
    "dense head": "head",
}


def _module(model, path: str):
    for name in path.split("."):
        model = getattr(model, name, None)
        if model is None:
            return None
    return model


def _time_parts(model) -> dict[str, float]:
    """Forward hooks accumulating each part's seconds into the returned dict."""
    totals, starts = {}, {}
    for label, path in PARTS.items():
        module = _module(model, path)
        if module is None:
            continue
        totals[label] = 0.0
        module.register_forward_pre_hook(
            lambda m, i, label=label: starts.__setitem__(label, time.perf_counter())
        )
        module.register_forward_hook(
            lambda m, i, o, label=label: totals.__setitem__(
                label, totals[label] + time.perf_counter() - starts[label]
            )
        )
    return totals


def measure(
    config_file: str, opts: list[str], phase: str, changes: dict, iters: int, warmup: int
) -> dict:
    """Train ``warmup + iters`` iterations of one setting; return its timings and memory."""
    torch.manual_seed(0)
    cfg = phase_cfg(config_file, [*opts, "DATALOADER.NUM_WORKERS", "0"], phase, changes)
    model = DirectPretrainTrainer.build_model(cfg)
    optimizer = DirectPretrainTrainer.build_optimizer(cfg, model)
    for group in optimizer.param_groups:  # the LR of a run's first (warmup) iterations
        group["lr"] *= cfg.SOLVER.WARMUP_FACTOR
    loader = iter(DirectPretrainTrainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(warmup + iters)]
    pixels = sum(
        b["image"].shape[1] * b["image"].shape[2] for batch in batches for b in batch
    ) / sum(len(b) for b in batches)
    parts = _time_parts(model)
    model.train()
    forward = backward = update = 0.0
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    from detectron2.utils.events import EventStorage

    with EventStorage():
        for step, batch in enumerate(batches):
            if step == warmup:
                forward = backward = update = 0.0
                parts.update({k: 0.0 for k in parts})
            sync()
            t0 = time.perf_counter()
            loss = sum(model(batch).values())
            sync()
            t1 = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            optimizer.step()
            sync()
            forward += t1 - t0
            backward += t2 - t1
            update += time.perf_counter() - t2
    images = iters * cfg.SOLVER.IMS_PER_BATCH
    ms = {k: 1000 * v / images for k, v in parts.items()}
    if "backbone+FPN" in ms and "backbone body" in ms:
        ms["FPN"] = ms.pop("backbone+FPN") - ms["backbone body"]
    ms["other forward"] = 1000 * forward / images - sum(ms.values())
    ms["backward"] = 1000 * backward / images
    ms["optimizer step"] = 1000 * update / images
    return {
        "images_per_s": images / (forward + backward + update),
        "pixels": pixels,
        "ms_per_image": ms,
        "peak_mb": peak_memory_mb(),
        "roi_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        "size": f"{int(pixels ** 0.5)}^2",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--batch", type=int, default=4, help="images per iteration, both phases")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()

    base = phase_cfg(args.config_file, args.opts, "FINETUNE")
    fine_roi = base.DIRECT_PRETRAIN.FINETUNE.ROI_BATCH_SIZE_PER_IMAGE
    pre_roi = base.DIRECT_PRETRAIN.PRETRAIN.ROI_BATCH_SIZE_PER_IMAGE
    settings = [("fine-tune", "FINETUNE", {}), ("pre-train", "PRETRAIN", {})]
    # RoI sampling is the lever against the RoI heads' cost, which does not shrink with
    # the input: show the pre-train setting with the fine-tune's RoIs and with half its own.
    for roi in dict.fromkeys((fine_roi, pre_roi // 2)):
        if roi != pre_roi:
            settings.append(
                (f"pre-train, {roi} RoIs/image", "PRETRAIN", {"ROI_BATCH_SIZE_PER_IMAGE": roi})
            )
    results = {}
    for label, phase, changes in settings:
        changes = {"IMS_PER_BATCH": args.batch, **changes}
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            results[label] = pool.submit(
                measure, args.config_file, args.opts, phase, changes, args.iters, args.warmup
            ).result()
        print(f"{label}: {results[label]['images_per_s']:.2f} images/s", flush=True)

    fine = results["fine-tune"]
    parts = list(fine["ms_per_image"])
    rows = []
    for label, r in results.items():
        ratio = fine["pixels"] / r["pixels"]
        speed = r["images_per_s"] / fine["images_per_s"]
        rows.append(
            [
                label,
                r["size"],
                r["roi_per_image"],
                r["images_per_s"],
                speed,
                ratio,
                f"{speed / ratio:.2f}",
                round(r["peak_mb"]),
                *[round(r["ms_per_image"].get(p, 0.0)) for p in parts],
            ]
        )
    print(
        f"\n{machine()}\nbatch {args.batch}, {args.iters} timed iterations, "
        f"{args.config_file}\n"
    )
    print(
        table(
            [
                "setting",
                "input",
                "RoIs/img",
                "images/s",
                "speed-up",
                "pixel ratio",
                "speed-up / ratio",
                "peak MB",
                *[f"{p} ms/img" for p in parts],
            ],
            rows,
        )
    )
    save_json(args.json, {"machine": machine(), "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
