"""What the pipeline needs from a config system: one implementation for yacs, one for LazyConfig.

The pipeline (:mod:`.pipeline`) is written once against :class:`ConfigKind`; ``kind_of(cfg)``
picks the implementation from the config's type.
"""

from __future__ import annotations

import copy
import logging

import yaml
from detectron2.config import CfgNode, LazyConfig, instantiate
from omegaconf import DictConfig

from .config import lookup
from .lazy import LazyPhaseTrainer, lazy_evaluate, lazy_phase_config, lazy_to_flat_dict
from .phases import PHASE_CONTROLLED_KEYS, phase_config
from .trainer import DirectPretrainTrainer, training_dicts
from .utils.env import check_cpp_requirements
from .utils.io import atomic_write_text, flatten_dict

__all__ = ["ConfigKind", "kind_of"]

logger = logging.getLogger(__name__)


class ConfigKind:
    """Accessors and builders the pipeline uses; each method takes the config it acts on."""

    # Flat keys that may change between a run and its resume without changing the result.
    resume_safe_keys: tuple[str, ...] = ()

    # Names of the device and initial-weights settings, for messages.
    device_key: str = ""
    weights_key: str = ""

    def output_dir(self, cfg) -> str: ...
    def weights(self, cfg) -> str: ...
    def num_classes(self, cfg) -> dict[str, int]: ...
    def pixel_stats(self, cfg) -> tuple[list[float], list[float]]: ...
    def with_weights(self, cfg, path: str): ...
    def dataset_names(self, cfg) -> list[str]:
        """Training then test dataset names."""
        train, test = self.split_names(cfg)
        return [*train, *test]

    def split_names(self, cfg) -> tuple[list[str], list[str]]: ...
    def save_pipeline(self, cfg, path: str) -> None: ...
    def check(self, cfg) -> None: ...
    def train_dicts(self, cfg) -> list[dict]: ...
    def image_format(self, cfg) -> str: ...
    def with_pixel_stats(self, cfg, mean: list[float], std: list[float]): ...
    def phase_config(self, cfg, phase: str, num_images: int): ...
    def device(self, pcfg) -> str: ...
    def trainer(self, pcfg): ...
    def build_model(self, pcfg, on_cpu: bool = False): ...
    def evaluate(self, pcfg, model) -> dict: ...
    def save(self, pcfg, path: str) -> None: ...
    def flat(self, pcfg) -> dict: ...


class YacsKind(ConfigKind):
    resume_safe_keys = (
        "DATALOADER.NUM_WORKERS",
        "MODEL.DEVICE",
        "SOLVER.CHECKPOINT_PERIOD",
        "TEST.EVAL_PERIOD",
        "SOLVER.AMP.ENABLED",
        "OUTPUT_DIR",
    )
    device_key = "MODEL.DEVICE"
    weights_key = "MODEL.WEIGHTS"

    def output_dir(self, cfg):
        return cfg.OUTPUT_DIR

    def weights(self, cfg):
        return cfg.MODEL.WEIGHTS

    def num_classes(self, cfg):
        arch = cfg.MODEL.META_ARCHITECTURE.replace("AlignDet", "")
        key = _NUM_CLASSES_KEYS.get(arch)
        return {} if key is None else {key: lookup(cfg, key)}

    def pixel_stats(self, cfg):
        return list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)

    def with_weights(self, cfg, path):
        return _yacs_with(cfg, lambda c: c.MODEL.__setattr__("WEIGHTS", path))

    def split_names(self, cfg):
        return list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)

    def save_pipeline(self, cfg, path):
        tree = yaml.safe_load(cfg.dump())
        for key in PHASE_CONTROLLED_KEYS:
            *parents, leaf = key.split(".")
            node = tree
            for parent in parents:
                node = node.get(parent, {})
            node.pop(leaf, None)
        header = (
            "# The pipeline config as it ran (pixel statistics resolved). Keys that each phase "
            "sets are left out:\n# each phase's values are in <phase>/phase_config.yaml.\n"
        )
        atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=True))

    def check(self, cfg):
        check_cpp_requirements(cfg)

    def train_dicts(self, cfg):
        return training_dicts(cfg)

    def image_format(self, cfg):
        return cfg.INPUT.FORMAT

    def with_pixel_stats(self, cfg, mean, std):
        def set_stats(c):
            c.MODEL.PIXEL_MEAN, c.MODEL.PIXEL_STD = list(mean), list(std)

        return _yacs_with(cfg, set_stats)

    def phase_config(self, cfg, phase, num_images):
        return phase_config(cfg, phase, num_images)

    def device(self, pcfg):
        return pcfg.MODEL.DEVICE

    def trainer(self, pcfg):
        return DirectPretrainTrainer(pcfg)

    def build_model(self, pcfg, on_cpu=False):
        if on_cpu:
            pcfg = _yacs_with(pcfg, lambda c: c.MODEL.__setattr__("DEVICE", "cpu"))
        return DirectPretrainTrainer.build_model(pcfg)

    def evaluate(self, pcfg, model):
        return DirectPretrainTrainer.test(pcfg, model)

    def save(self, pcfg, path):
        atomic_write_text(path, pcfg.dump())

    def flat(self, pcfg):
        return flatten_dict(yaml.safe_load(pcfg.dump()))


class LazyKind(ConfigKind):
    resume_safe_keys = (
        "train.device",
        "train.checkpointer.period",
        "train.checkpointer.max_to_keep",
        "train.eval_period",
        "train.log_period",
        "train.amp.enabled",
        "train.output_dir",
        "dataloader.train.num_workers",
        "dataloader.test.num_workers",
        "dataloader.evaluator.output_dir",
    )
    device_key = "train.device"
    weights_key = "train.init_checkpoint"

    def output_dir(self, cfg):
        return cfg.train.output_dir

    def weights(self, cfg):
        return cfg.train.init_checkpoint

    def num_classes(self, cfg):
        model = cfg.model
        if "roi_heads" in model and "num_classes" in model.roi_heads:
            return {"model.roi_heads.num_classes": model.roi_heads.num_classes}
        return {"model.num_classes": model.num_classes} if "num_classes" in model else {}

    def pixel_stats(self, cfg):
        return list(cfg.model.pixel_mean), list(cfg.model.pixel_std)

    def with_weights(self, cfg, path):
        cfg = copy.deepcopy(cfg)
        cfg.train.init_checkpoint = path
        return cfg

    def split_names(self, cfg):
        return (
            _as_list(cfg.dataloader.train.dataset.names),
            _as_list(cfg.dataloader.test.dataset.names),
        )

    def save_pipeline(self, cfg, path):
        LazyConfig.save(cfg, path)

    def check(self, cfg):
        pass  # Detectron2's common LazyConfig models need no C++ op; a custom one fails on use

    def train_dicts(self, cfg):
        return instantiate(cfg.dataloader.train.dataset)

    def image_format(self, cfg):
        return cfg.dataloader.train.mapper.image_format

    def with_pixel_stats(self, cfg, mean, std):
        cfg = copy.deepcopy(cfg)
        cfg.model.pixel_mean, cfg.model.pixel_std = list(mean), list(std)
        return cfg

    def phase_config(self, cfg, phase, num_images):
        return lazy_phase_config(cfg, phase, num_images)

    def device(self, pcfg):
        return pcfg.train.device

    def trainer(self, pcfg):
        return LazyPhaseTrainer(pcfg)

    def build_model(self, pcfg, on_cpu=False):
        return instantiate(pcfg.model).to("cpu" if on_cpu else pcfg.train.device)

    def evaluate(self, pcfg, model):
        return lazy_evaluate(pcfg, model)

    def save(self, pcfg, path):
        LazyConfig.save(pcfg, path)

    def flat(self, pcfg):
        return lazy_to_flat_dict(pcfg)


# Class-count key of each detector (AlignDet's box-domain versions share them).
_NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "FCOSDetector": "MODEL.FCOS.NUM_CLASSES",
    "FCOS": "MODEL.FCOS.NUM_CLASSES",
}


def _yacs_with(cfg: CfgNode, change) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    change(cfg)
    cfg.freeze()
    return cfg


def _as_list(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def kind_of(cfg) -> ConfigKind:
    """The :class:`ConfigKind` of ``cfg`` (a yacs ``CfgNode`` or a LazyConfig ``DictConfig``)."""
    if isinstance(cfg, CfgNode):
        return YacsKind()
    if isinstance(cfg, DictConfig):
        return LazyKind()
    raise TypeError(f"unsupported config type {type(cfg).__name__}")
