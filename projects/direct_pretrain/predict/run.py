"""Load a finished run for inference: its config (last phase, resolved) and final weights.

A finished run folder holds ``model_final.pth``, ``summary.json`` and one ``phase_config.yaml``
per phase; the pipeline also exports ``config_predict.yaml`` (a plain Detectron2 config of the
final model) and ``classes.json`` (class names and dataset category ids) beside the weights, so
that prediction needs neither the training set nor a registered dataset.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from detectron2.config import CfgNode, LazyConfig
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from omegaconf import DictConfig

from ..config import get_cfg
from ..evaluation import load_weights_strictly
from ..kinds import kind_of
from ..phases import active_phases
from ..utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "CLASSES_FILE",
    "PREDICT_CONFIG_FILE",
    "ClassInfo",
    "Predictor",
    "class_info",
    "export_for_prediction",
    "load_predict_config",
    "load_run",
    "inference_size",
]

logger = logging.getLogger(__name__)

PREDICT_CONFIG_FILE = "config_predict.yaml"
CLASSES_FILE = "classes.json"
FINAL_MODEL = "model_final.pth"
# Project keys a model needs at inference, by what selects them (others are training-only).
_MODEL_NODES = {
    "FCOS": lambda cfg: cfg.MODEL.META_ARCHITECTURE == "FCOSDetector",
    "SWIN": lambda cfg: cfg.MODEL.BACKBONE.NAME == "build_swin_fpn_backbone",
}


@dataclass(frozen=True)
class ClassInfo:
    """Class names and dataset category ids, indexed by the model's class index."""

    names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()

    def name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else str(index)

    def category_id(self, index: int) -> int:
        return self.category_ids[index] if index < len(self.category_ids) else index


def _is_lazy(cfg) -> bool:
    return isinstance(cfg, DictConfig)


def _plain_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` without the keys Detectron2's own ``get_cfg()`` lacks, except the project
    model nodes the model uses (FCOS, Swin)."""

    def prune(node: CfgNode, reference: CfgNode) -> None:
        for key in list(node.keys()):
            if key not in reference:
                del node[key]
            elif isinstance(node[key], CfgNode) and isinstance(reference[key], CfgNode):
                prune(node[key], reference[key])

    out = cfg.clone()
    out.defrost()
    kept = {k: out.MODEL[k] for k, used in _MODEL_NODES.items() if k in out.MODEL and used(out)}
    prune(out, d2_get_cfg())
    for key, node in kept.items():
        out.MODEL[key] = node
    return out


def export_for_prediction(pcfg, output_dir: str) -> None:
    """Write ``config_predict.yaml`` (yacs runs) and ``classes.json`` into the run folder.

    Args:
        pcfg: the resolved config of the phase whose final model is
            ``output_dir/model_final.pth`` (nothing is written for a BOX_DOMAIN phase, whose
            model is not a detector).
        output_dir: the run folder.
    """
    if pcfg.DIRECT_PRETRAIN.PHASE == "BOX_DOMAIN":
        return
    if not _is_lazy(pcfg):
        plain = _plain_config(pcfg)
        plain.MODEL.WEIGHTS = os.path.abspath(os.path.join(output_dir, FINAL_MODEL))
        plain.OUTPUT_DIR = os.path.abspath(output_dir)
        atomic_write_text(os.path.join(output_dir, PREDICT_CONFIG_FILE), plain.dump())
    dataset_name = kind_of(pcfg).split_names(pcfg)[0][0]
    meta = MetadataCatalog.get(dataset_name)
    names = meta.get("thing_classes", None)
    if names is None:
        logger.warning(
            "Dataset '%s' has no thing_classes: predictions will name classes by index.",
            dataset_name,
        )
        return
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
    ids = {v: int(k) for k, v in to_contiguous.items()}
    atomic_write_json(
        os.path.join(output_dir, CLASSES_FILE),
        {
            "dataset": dataset_name,
            "thing_classes": list(names),
            "category_ids": [ids.get(i, i) for i in range(len(names))],
        },
    )


def _run_phase_config(run: Path) -> Path:
    """The saved config of the phase that produced ``run/model_final.pth``."""
    from ..pipeline import PHASE_CONFIG_FILE, SUMMARY_FILE  # the pipeline imports this module

    summary = run / SUMMARY_FILE
    if not summary.is_file():
        raise FileNotFoundError(
            f"{summary} not found: '{run}' is not a finished run of train_net.py"
        )
    phases = list(json.loads(summary.read_text()).get("phases", {}))
    if not phases:
        raise ValueError(f"{summary} lists no phase")
    return run / phases[-1].lower() / PHASE_CONFIG_FILE


def load_run(run_dir: str | os.PathLike, opts: Sequence[str] = (), device: str | None = None):
    """The inference config of a finished run, with its weights ``run_dir/model_final.pth``.

    Reads the run's ``config_predict.yaml`` (or, for runs without it, the last phase's
    ``phase_config.yaml``): the final model, its pixel mean/std as trained and the last phase's
    test size. ``DefaultPredictor(load_run(run_dir))`` predicts with it.

    Args:
        run_dir: the run's ``OUTPUT_DIR``.
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``a.b=c`` (LazyConfig runs).
        device: "cpu" or "cuda"; default: "cuda" if available, else "cpu".

    Returns:
        A frozen yacs ``CfgNode``, or a LazyConfig ``DictConfig`` for LazyConfig runs.
    """
    run = Path(run_dir)
    weights = run / FINAL_MODEL
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: '{run}' is not a finished run (train_net.py writes "
            f"{FINAL_MODEL} after the last phase)"
        )
    config = run / PREDICT_CONFIG_FILE
    if not config.is_file():
        config = _run_phase_config(run)
    return load_predict_config(str(config), str(weights), opts, device)


def _is_lazy_file(path: str) -> bool:
    """Whether ``path`` is a LazyConfig (``.py``, or saved ``.yaml`` with a top-level
    ``model``) rather than a yacs config (top-level ``MODEL``)."""
    if path.endswith(".py"):
        return True
    with open(path, encoding="utf-8") as f:  # top-level keys only (saved LazyConfigs hold
        top = {line.partition(":")[0] for line in f if line[:1].isalpha()}  # python tags)
    return "model" in top and "MODEL" not in top


def load_predict_config(
    config_file: str,
    weights: str | None = None,
    opts: Sequence[str] = (),
    device: str | None = None,
):
    """An inference config from a config file: a run's saved config (``config_predict.yaml``,
    a ``phase_config.yaml``), a project training config (its last phase is used) or a plain
    Detectron2 config.

    Args:
        config_file: yacs ``.yaml`` or LazyConfig ``.py``/saved ``.yaml``.
        weights: the model weights; else ``MODEL.WEIGHTS`` (``train.init_checkpoint``).
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``a.b=c`` (LazyConfig).
        device: "cpu" or "cuda"; default: "cuda" if available, else "cpu".

    Raises:
        ValueError: naming the file: no weights; a training config whose pixel statistics
            were computed on the training set and are saved neither with the weights nor in
            the config; a last phase that is not a detector (BOX_DOMAIN).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file '{config_file}' not found")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_lazy_file(config_file):
        cfg = LazyConfig.load(config_file)
        cfg.train.device = device
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
        weights_key, project = "train.init_checkpoint", "DIRECT_PRETRAIN" in cfg
    else:
        cfg = get_cfg()
        cfg.merge_from_file(config_file)
        cfg.MODEL.DEVICE = device
        cfg.merge_from_list(list(opts))
        weights_key = "MODEL.WEIGHTS"
        project = cfg.DIRECT_PRETRAIN != get_cfg().DIRECT_PRETRAIN
    kind = kind_of(cfg)
    weights = weights or _option(opts, weights_key)
    if project:  # a training or phase config: resolve its last phase
        if not weights:
            raise ValueError(
                f"{config_file} is a training or phase config: its {weights_key} is where "
                f"training started, not the trained model. Pass the trained weights "
                f"({weights_key} ...), or predict with the run folder (--run OUTPUT_DIR)."
            )
        cfg = _with_saved_pixel_stats(kind, cfg, weights, config_file)
        cfg = kind.phase_config(cfg, _last_phase(cfg, config_file), 1)
    cfg = kind.with_weights(cfg, str(weights)) if weights else cfg
    if not kind.weights(cfg):
        raise ValueError(f"{config_file}: no weights (set {weights_key})")
    if not _is_lazy(cfg):
        cfg.freeze()
    return cfg


def _option(opts: Sequence[str], key: str) -> str:
    """The value of ``key`` in ``KEY VALUE`` (or ``key=value``) overrides, else ""."""
    opts = list(opts)
    for i, opt in enumerate(opts):
        if opt == key and i + 1 < len(opts):
            return opts[i + 1]
        if opt.startswith(key + "="):
            return opt.partition("=")[2]
    return ""


def _with_saved_pixel_stats(kind, cfg, weights: str, config_file: str):
    """``cfg`` with the pixel statistics the model trained with, if computed on its data."""
    from ..pipeline import saved_pixel_stats  # the pipeline imports this module

    node = cfg.DIRECT_PRETRAIN
    if node.PIXEL_STATS != "dataset":
        return cfg
    saved = saved_pixel_stats(weights) if weights.endswith(".pth") else None
    if saved is not None:
        return kind.with_pixel_stats(cfg, *saved)
    if node.PHASE:  # a phase_config.yaml holds the statistics its phase trained with
        return cfg
    raise ValueError(
        f"{config_file} has DIRECT_PRETRAIN.PIXEL_STATS 'dataset' (pixel mean/std computed "
        f"on the training set when it trains), and neither {weights} nor the folder beside it "
        "holds the values the model trained with. Predict with the run folder (--run "
        "OUTPUT_DIR) or its config_predict.yaml, or set MODEL.PIXEL_MEAN/PIXEL_STD with "
        "DIRECT_PRETRAIN.PIXEL_STATS config."
    )


def _last_phase(cfg, config_file: str) -> str:
    phase = active_phases(cfg)[-1]
    if phase == "BOX_DOMAIN":
        raise ValueError(
            f"{config_file}: the last phase is BOX_DOMAIN (AlignDet box-domain pre-training), "
            "whose model is not a detector; fine-tune it first"
        )
    return phase


def inference_size(cfg) -> tuple[int, int]:
    """The model's test resize: (short side, long-side cap) of the config."""
    if _is_lazy(cfg):
        resize = _lazy_resize(cfg)
        short = resize.short_edge_length
        return int(short[0] if isinstance(short, Sequence) else short), int(resize.max_size)
    return int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)


def _lazy_resize(cfg: DictConfig):
    augs = [a for a in cfg.dataloader.test.mapper.augmentations if "short_edge_length" in a]
    if len(augs) != 1:
        raise ValueError(
            "LazyConfig: dataloader.test.mapper.augmentations must hold one "
            "ResizeShortestEdge (the test resize)"
        )
    return augs[0]


def class_info(cfg, folder: str | os.PathLike | None = None) -> ClassInfo:
    """Class names and category ids: ``folder/classes.json`` (a run folder), else the metadata
    of the config's training dataset if it is registered, else classes named by index."""
    path = Path(folder) / CLASSES_FILE if folder is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return ClassInfo(tuple(saved["thing_classes"]), tuple(saved["category_ids"]))
    name = cfg.dataloader.train.dataset.names if _is_lazy(cfg) else (cfg.DATASETS.TRAIN or [""])[0]
    name = name if isinstance(name, str) else name[0]
    meta = MetadataCatalog.get(name) if name else None
    names = meta.get("thing_classes", None) if meta is not None else None
    if not names:
        logger.warning(
            "No %s in the run and no class names for dataset '%s': classes are named by "
            "their index.",
            CLASSES_FILE,
            name,
        )
        return ClassInfo()
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id", None) or {}
    ids = {v: int(k) for k, v in to_contiguous.items()}
    return ClassInfo(tuple(names), tuple(ids.get(i, i) for i in range(len(names))))


class Predictor:
    """Detectron2's ``DefaultPredictor`` for either config kind, with strict weight loading.

    Takes one BGR image (HWC uint8, as ``DefaultPredictor``), applies the model's test
    resize and input format and returns the model's output dict (``"instances"`` in the
    input image's pixels). A checkpoint that does not fit the model is an error naming the keys.
    """

    def __init__(self, cfg) -> None:
        if _is_lazy(cfg):
            self.model = instantiate(copy.deepcopy(cfg.model)).to(cfg.train.device)
            weights = cfg.train.init_checkpoint
            resize = _lazy_resize(cfg)
            self.aug = T.ResizeShortestEdge(resize.short_edge_length, resize.max_size)
            self.input_format = cfg.dataloader.test.mapper.image_format
        else:
            self.model = build_model(cfg)
            weights = cfg.MODEL.WEIGHTS
            min_size, max_size = inference_size(cfg)
            self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)
            self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"input format '{self.input_format}' is not RGB or BGR")
        self.model.eval()
        load_weights_strictly(self.model, weights)

    def __call__(self, original_image) -> dict:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]
