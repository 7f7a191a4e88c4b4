"""Shared fixtures: a tiny synthetic COCO dataset and a tiny R-18 Faster R-CNN config."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from direct_pretrain import get_cfg
from direct_pretrain.planning.rules import CPU_BATCH

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs two pytest-xdist workers: each gets its share of the cores (in-process and
# for the train_net.py subprocesses), or their threads would oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def write_synthetic_coco(
    folder: Path, num_images: int, size: int, seed: int, num_classes: int = 1
) -> Path:
    """Dark images with bright rectangles (the objects), as a COCO json; with ``num_classes``
    above 1 each object draws its class (named box, box2, box3, ...) at random."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.integers(size // 6, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y : y + h, x : x + w] = rng.integers(150, 255, 3, dtype=np.uint8)
            x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
            category = int(rng.integers(1, num_classes + 1)) if num_classes > 1 else 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "iscrowd": 0,
                    "category_id": category,
                }
            )
        name = f"img{i:03d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    json_file = folder / "annotations.json"
    names = ["box", *(f"box{k}" for k in range(2, num_classes + 1))]
    categories = [{"id": k, "name": name} for k, name in enumerate(names, 1)]
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_file


def synthetic_splits(root: Path, train_images: int, train_seed: int) -> dict[str, tuple[str, str]]:
    """``{"train"|"val": (json_file, image_root)}``: ``train_images`` 64-px training images and
    3 test images under ``root``."""
    out = {}
    for split, count, seed in (("train", train_images, train_seed), ("val", 3, 1)):
        json_file = write_synthetic_coco(root / split, count, 64, seed)
        out[split] = (str(json_file), str(root / split / "images"))
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A tiny synthetic dataset: 8 training images, 3 test images."""
    return synthetic_splits(tmp_path_factory.mktemp("synthetic"), 8, 0)


def tiny_cfg(synthetic_data, output_dir: Path, cache_dir: Path | None = None):
    """The demo config made small enough to train a few iterations in seconds on CPU."""
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml"))
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    return shrink(cfg, synthetic_data, output_dir, cache_dir)


def shrink(cfg, synthetic_data, output_dir: Path, cache_dir: Path | None = None):
    """Any pipeline config (yacs or LazyConfig) on the synthetic data, with tiny images,
    batches and schedules. The architecture is kept; only sizes that cost time shrink."""
    if not isinstance(cfg, DictConfig):
        cfg.defrost()
    node = cfg.DIRECT_PRETRAIN
    node.REGISTER_COCO = [
        ["tiny_train", *synthetic_data["train"]],
        ["tiny_val", *synthetic_data["val"]],
    ]
    node.CACHE_DIR = str(cache_dir or output_dir / "cache")
    node.PIXEL_STATS = "config"
    for phase, size, batch in (("PRETRAIN", 32, 4), ("BOX_DOMAIN", 64, 2), ("FINETUNE", 64, 2)):
        phase_node = node[phase]
        phase_node.SCALE = [size, size]
        phase_node.CROP_SIZE = [size, size]
        phase_node.MIN_SIZE_TRAIN = [size]
        phase_node.MAX_SIZE_TRAIN = size
        phase_node.MIN_SIZE_TEST = size
        phase_node.MAX_SIZE_TEST = size
        phase_node.IMS_PER_BATCH = batch
        phase_node.MAX_ITER = 2
        phase_node.WARMUP_ITERS = 2
        # Two iterations leave BN statistics near their init; a small LR keeps FrozenBN
        # fine-tuning of deep backbones finite.
        phase_node.BASE_LR = min(phase_node.BASE_LR, 0.002)
        if not isinstance(cfg, DictConfig) or "roi_heads" in cfg.model:  # R-CNNs only
            phase_node.ROI_BATCH_SIZE_PER_IMAGE = 32
        phase_node.CHECKPOINT_PERIOD = 1
        phase_node.AMP = False
    if isinstance(cfg, DictConfig):
        _shrink_lazy(cfg, output_dir)
    else:
        _shrink_yacs(cfg, output_dir)
    return cfg


def fake_calibration(seconds: float = 0.5):
    """A planner calibration that times nothing: ``seconds`` per iteration at the planner's CPU
    batch, proportionally more at larger batches (the same images per second, as measured on
    CPU); ``.calls`` lists the phases and batches it was asked for."""
    calls = []

    def calibrate(pcfg):
        phase = pcfg.DIRECT_PRETRAIN.PHASE
        lazy = isinstance(pcfg, DictConfig)
        batch = pcfg.dataloader.train.total_batch_size if lazy else pcfg.SOLVER.IMS_PER_BATCH
        calls.append((phase, batch))
        per_iter = seconds * batch / CPU_BATCH[phase]
        return {"seconds_per_iter": per_iter, "peak_mb": 0.0, "steps": 1}

    calibrate.calls = calls
    return calibrate


def write_config(cfg, path: Path) -> Path:
    """Write a yacs pipeline config as a run's ``config.yaml`` is written (without the keys the
    phases set), so that ``train_net.py --config-file`` takes it."""
    from direct_pretrain.config_systems import system_of

    system_of(cfg).save_pipeline(cfg, str(path))
    return path


def train_net(config: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``train_net.py --config-file config`` as a user runs it, its output captured."""
    return subprocess.run(
        [sys.executable, "train_net.py", "--config-file", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _shrink_yacs(cfg, output_dir: Path) -> None:
    cfg.ALIGNDET.VIEW.MIN_SIZE_TRAIN = (48, 64)
    cfg.ALIGNDET.VIEW.MAX_SIZE_TRAIN = 64
    cfg.ALIGNDET.VIEW.MIN_BOX_SIZE = 4.0
    cfg.ALIGNDET.PROPOSALS.NUM_WORKERS = 1
    cfg.ALIGNDET.PROPOSALS.MIN_SIDE = 8.0  # 64 px images: the public 32 px leaves few boxes
    cfg.ALIGNDET.POSITIVES_PER_IMAGE = 32
    cfg.DATASETS.TRAIN = ("tiny_train",)
    cfg.DATASETS.TEST = ("tiny_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = 1
    cfg.MODEL.FCOS.NUM_CLASSES = 1
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.OUTPUT_DIR = str(output_dir)


def _shrink_lazy(cfg, output_dir: Path) -> None:
    cfg.dataloader.train.dataset.names = "tiny_train"
    cfg.dataloader.test.dataset.names = "tiny_val"
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.test.num_workers = 0
    model = cfg.model
    if "roi_heads" in model:
        model.roi_heads.num_classes = 1
        model.proposal_generator.update(pre_nms_topk=[200, 100], post_nms_topk=[100, 50])
    else:
        model.num_classes = 1
    cfg.train.output_dir = str(output_dir)
    cfg.train.device = "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def _probe_cpu_ddp(result_file: str) -> None:
    """In each of 2 launched processes: whether create_ddp_model wraps a CPU model."""
    import torch.distributed as dist
    from detectron2.engine import create_ddp_model
    from detectron2.utils import comm

    try:
        create_ddp_model(torch.nn.Linear(1, 1))
        gap = ""
    except Exception as e:  # noqa: BLE001 - the reason is the result
        gap = f"create_ddp_model: {type(e).__name__}: {e}"
    if comm.is_main_process():
        Path(result_file).write_text(gap)
    dist.destroy_process_group()
    os._exit(0)  # no Python finalisation: gloo threads still referenced then can abort it


@functools.lru_cache(maxsize=None)
def cpu_multiprocess_gaps() -> tuple[str, str]:
    """Why the installed detectron2 cannot (launch 2 CPU processes, wrap a model in DDP there);
    "" where it can. Measured once, by doing it: upstream main launches on gloo but passes GPU
    device ids to DDP for CPU models; v0.6 asserts CUDA in launch (the registry copy is fixed)."""
    from detectron2.engine import launch

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ddp.txt"
        try:
            launch(_probe_cpu_ddp, 2, dist_url="auto", args=(str(result),))
        except Exception as e:  # noqa: BLE001 - the reason is the result
            gap = f"launch: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
            return gap, gap
        return "", result.read_text()


def skip_without_cpu_multiprocess(ddp: bool) -> None:
    """Skip the calling test, with the reason, where this detectron2 cannot run 2 CPU
    processes (``ddp``: and train them with DistributedDataParallel)."""
    launch_gap, ddp_gap = cpu_multiprocess_gaps()
    gap = launch_gap or (ddp_gap if ddp else "")
    if gap:
        pytest.skip(f"this detectron2 cannot {'train' if ddp else 'run'} 2 CPU processes: {gap}")
