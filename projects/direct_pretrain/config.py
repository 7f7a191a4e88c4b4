"""The config schema: the ``DIRECT_PRETRAIN`` node, its defaults and checks of user keys.

One config describes the whole pipeline. Everything that differs between phases (input size,
norms, batch, optimizer, schedule) lives under ``DIRECT_PRETRAIN.<PHASE>``; everything else
(model, datasets, anchors, ...) is shared and read from the usual Detectron2 keys.
:func:`direct_pretrain.phases.resolve_phase` is the one reader of a phase node; loading a
config file is :mod:`direct_pretrain.config_systems`' job.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Sequence

import yaml
from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg as _d2_get_cfg

from . import aligndet as _aligndet  # noqa: F401 - registers the BOX_DOMAIN phase kind
from .modeling import add_fcos_config, add_swin_config
from .phase_kinds import registered_phase_kinds
from .utils.io import flatten_dict

__all__ = [
    "CfgNode",
    "add_direct_pretrain_config",
    "check_lazy_node",
    "default_direct_pretrain",
    "get_cfg",
    "lookup",
    "model_zoo_path",
    "new_phase_node",
    "phase_names",
    "user_keys",
]

CN = _D2CfgNode

MODEL_ZOO_PREFIX = "model_zoo:"


def new_phase_node(**overrides) -> CN:
    """A phase node: the keys every phase has, with this phase's defaults."""
    node = CN()
    # How the phase's weights start: "scratch" (random init), "previous" (the previous
    # phase's final model through the checkpoint bridge) or "weights" (MODEL.WEIGHTS).
    node.INIT = "scratch"
    # With INIT "previous": regular expression of the weights taken from the previous phase
    # (others keep their fresh init, reported); "" takes all.
    node.INIT_KEYS = ""
    # Training resize: "fixed_size_crop" (scale-jitter to fit SCALE, random crop and pad to
    # CROP_SIZE, the paper's pre-training) or "shortest_edge" (MIN/MAX_SIZE_TRAIN).
    node.AUGMENTATION = "shortest_edge"
    # fixed_size_crop: target (height, width) the image is resized to fit, keeping its ratio.
    node.SCALE = (448, 448)
    # fixed_size_crop: random factor range applied to SCALE.
    node.RATIO_RANGE = (0.8, 1.2)
    # fixed_size_crop: (height, width) of the random crop; smaller images are padded to it.
    node.CROP_SIZE = (448, 448)
    # fixed_size_crop: read a copy of each training image stored at the largest size the
    # augmentation produces (built once under CACHE_DIR) instead of decoding it at full size.
    node.RESIZED_CACHE = False
    # shortest_edge: short-side sizes sampled per image, and the long-side cap.
    node.MIN_SIZE_TRAIN = (800,)
    node.MAX_SIZE_TRAIN = 1333
    # Evaluation resize (short side, long-side cap) for this phase's AP.
    node.MIN_SIZE_TEST = 800
    node.MAX_SIZE_TEST = 1333
    # Horizontal flip during training.
    node.RANDOM_FLIP = True
    # Norm of the backbone, the FPN and the heads: "BN", "SyncBN", "naiveSyncBN",
    # "FrozenBN" (backbone only), "GN" or "" (none). SyncBN runs as naiveSyncBN on CPU.
    node.BACKBONE_NORM = "BN"
    node.FPN_NORM = ""
    node.HEAD_NORM = ""
    # Backbone stages frozen (0: none). Refused with INIT "scratch".
    node.FREEZE_AT = 0
    # Keep the backbone's BatchNorm statistics fixed while its affine parameters train
    # (MMDetection's norm_eval, the public AlignDet fine-tuning with SyncBN).
    node.BACKBONE_NORM_EVAL = False
    # Total images per iteration over all processes.
    node.IMS_PER_BATCH = 16
    # "SGD" (momentum 0.9) or "AdamW".
    node.OPTIMIZER = "SGD"
    node.BASE_LR = 0.02
    node.WEIGHT_DECAY = 1e-4
    # Weight decay of norm layers (the paper uses none in pre-training).
    node.WEIGHT_DECAY_NORM = 0.0
    # Length in epochs over the training set repeated DATASET_REPEAT times.
    node.EPOCHS = 12.0
    node.DATASET_REPEAT = 1
    # LR drops (x0.1) at these epochs; () keeps the LR fixed after warmup.
    node.STEP_EPOCHS = (8.0, 11.0)
    # If > 0, train exactly this many iterations; the LR drops keep their relative position.
    node.MAX_ITER = 0
    # Linear warmup: iterations and starting LR factor.
    node.WARMUP_ITERS = 1000
    node.WARMUP_FACTOR = 0.001
    # RoIs sampled per image for the box head (its cost does not shrink with resolution).
    node.ROI_BATCH_SIZE_PER_IMAGE = 512
    # Save a checkpoint every this many iterations (and at the end).
    node.CHECKPOINT_PERIOD = 5000
    # Evaluate every this many iterations (0: only at the end of the phase).
    node.EVAL_PERIOD = 0
    # Mixed precision (GPU only; ignored on CPU).
    node.AMP = False
    node.update(overrides)
    return node


def add_direct_pretrain_config(cfg: CN) -> None:
    """Add the ``DIRECT_PRETRAIN`` node (and defaults the project relies on) to ``cfg``."""
    cfg.DIRECT_PRETRAIN = CN()
    node = cfg.DIRECT_PRETRAIN
    # Phases run by the pipeline, in order.
    node.PIPELINE = ["PRETRAIN", "FINETUNE"]
    # Run only this phase (e.g. "PRETRAIN") instead of the whole pipeline; "" runs all.
    node.PHASE = ""
    # "config" uses MODEL.PIXEL_MEAN/STD as given; "dataset" computes them on the training
    # set (cached under CACHE_DIR), for data unlike ImageNet.
    node.PIXEL_STATS = "config"
    # Images sampled (evenly) to compute dataset pixel statistics.
    node.PIXEL_STATS_MAX_IMAGES = 1000
    # Folder for built datasets and caches; "" means $DIRECT_PRETRAIN_CACHE or
    # ~/.cache/direct_pretrain.
    node.CACHE_DIR = ""
    # COCO-format datasets to register: a list of [name, json_file, image_root].
    node.REGISTER_COCO = []
    # Pascal VOC datasets to register: a list of [name, annotations_dir, image_root, classes].
    node.REGISTER_VOC = []
    # YOLO datasets to register: a list of [name, labels_dir, image_root, classes_file].
    node.REGISTER_YOLO = []
    # What to do with an image that cannot be read: "stop" (error naming it) or "skip".
    node.BAD_IMAGES = "stop"
    # Training minutes of all phases together on this machine (evaluation not counted): every
    # phase key the config does not set is planned from the data and a short calibration
    # (:mod:`direct_pretrain.planning`, OUTPUT_DIR/plan.yaml). 0 plans nothing.
    node.BUDGET_MINUTES = 0.0
    # Fraction of the training images held out of every phase's training as a validation
    # slice on which the run's final model is chosen among its detector phases; 0: none.
    node.VAL_SLICE = 0.1
    # At most this many images in the validation slice.
    node.VAL_SLICE_MAX_IMAGES = 50

    node.BRIDGE = CN()
    # Re-initialise class-specific predictor layers when the class count differs
    # (otherwise a shape mismatch there is an error).
    node.BRIDGE.REINIT_PREDICTOR_ON_CLASS_CHANGE = True

    node.PRETRAIN = new_phase_node(
        AUGMENTATION="fixed_size_crop",
        RESIZED_CACHE=True,
        MIN_SIZE_TEST=448,
        MAX_SIZE_TEST=448,
        BACKBONE_NORM="BN",
        IMS_PER_BATCH=64,
        BASE_LR=0.08,
        EPOCHS=12.0,
        DATASET_REPEAT=4,
        STEP_EPOCHS=(),
        WARMUP_ITERS=500,
        WARMUP_FACTOR=0.01,
    )
    node.FINETUNE = new_phase_node(
        INIT="previous",
        BACKBONE_NORM="FrozenBN",
        IMS_PER_BATCH=16,
        BASE_LR=0.02,
    )
    add_fcos_config(cfg)
    add_swin_config(cfg)
    for kind in registered_phase_kinds().values():  # e.g. ALIGNDET and the BOX_DOMAIN node
        kind.add_config(cfg, new_phase_node)
    # The from-scratch pre-training phase trains every stage with trainable norms.
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.WEIGHTS = ""
    # Detectron2's "cuda" default; the project falls back to CPU when no GPU is present.
    cfg.MODEL.DEVICE = "cuda"


class CfgNode(_D2CfgNode):
    """Detectron2's CfgNode that also resolves ``_BASE_: "model_zoo:<path>"``.

    ``<path>`` is a file in Detectron2's model-zoo config folder, e.g.
    ``model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml``; relative ``_BASE_`` paths inside
    that file resolve inside the model zoo as usual.
    """

    @classmethod
    def _open_cfg(cls, filename: str):
        _, sep, zoo_relative = filename.partition(MODEL_ZOO_PREFIX)
        if sep:
            filename = model_zoo_path(zoo_relative)
        return super()._open_cfg(filename)

    def merge_from_other_cfg(self, cfg_other) -> None:
        """yacs' merge, also accepting an integer for a float key (``EPOCHS: 2``)."""
        _ints_to_floats(cfg_other, self)
        super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list: list) -> None:
        """yacs' merge of ``KEY VALUE`` pairs, also accepting an integer for a float key."""
        pairs = list(cfg_list)
        for i in range(0, len(pairs) - 1, 2):
            current = lookup(self, pairs[i])
            value = self._decode_cfg_value(pairs[i + 1])
            if isinstance(current, float) and _is_int(value):
                pairs[i + 1] = repr(float(value))
        super().merge_from_list(pairs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lookup(node, dotted: str):
    """The value at a dotted key of a config tree (yacs or LazyConfig), or None if a step is
    missing."""
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _ints_to_floats(other: dict, base: dict) -> None:
    """Turn integers in ``other`` into floats where ``base`` holds a float (in place)."""
    for key, value in other.items():
        current = base.get(key) if isinstance(base, dict) else None
        if isinstance(value, dict):
            _ints_to_floats(value, current)
        elif isinstance(current, float) and _is_int(value):
            other[key] = float(value)


def model_zoo_path(relative: str) -> str:
    """Path of a file in Detectron2's model-zoo config folder; raise if it does not exist."""
    spec = importlib.util.find_spec("detectron2")
    root = os.path.join(os.path.dirname(spec.origin), "model_zoo", "configs")
    path = os.path.normpath(os.path.join(root, relative))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{relative}' is not in Detectron2's model zoo ({root})")
    return path


def phase_names(node) -> list[str]:
    """The phase nodes of a ``DIRECT_PRETRAIN`` node (every child that has an ``INIT`` key)."""
    return [k for k, v in node.items() if isinstance(v, Mapping) and "INIT" in v]


def default_direct_pretrain() -> dict:
    """The ``DIRECT_PRETRAIN`` node's defaults as a plain dict, for LazyConfig files."""
    return yaml.safe_load(get_cfg().DIRECT_PRETRAIN.dump())


def get_cfg() -> CfgNode:
    """Detectron2's default config plus the ``DIRECT_PRETRAIN`` node."""
    cfg = _d2_get_cfg()
    add_direct_pretrain_config(cfg)
    return CfgNode(cfg)


def check_lazy_node(node, schema: CN | None = None, prefix: str = "DIRECT_PRETRAIN") -> None:
    """Check a LazyConfig's ``DIRECT_PRETRAIN`` against the yacs node: keys and value types.

    Raises:
        KeyError / ValueError naming the key.
    """
    schema = get_cfg().DIRECT_PRETRAIN if schema is None else schema
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if key not in schema:
            raise KeyError(f"Non-existent config key: {name}")
        expected = schema[key]
        if isinstance(expected, CN):
            check_lazy_node(value, expected, name)
        elif not _same_type(expected, value):
            raise ValueError(
                f"config key {name}: {value!r} is not of the type of its default " f"{expected!r}"
            )


def _same_type(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")
    return isinstance(value, type(default))


def user_keys(path: str, opts: Sequence[str] = ()) -> dict[str, str]:
    """The keys a yacs config sets itself, ``{key: where}``: every key of the command-line
    ``opts``, and the keys that ``path`` or the ``_BASE_`` files it names set to a value other
    than that of Detectron2's defaults and the model-zoo files among its bases (so that a
    dumped full config counts only for what it changes)."""
    keys: dict[str, str] = {}
    baseline = get_cfg()
    _file_keys(path, keys, baseline)
    merged = get_cfg()
    merged.merge_from_file(path)
    keys = {k: where for k, where in keys.items() if lookup(merged, k) != lookup(baseline, k)}
    keys.update({key: "the command line" for key in list(opts)[0::2]})
    return keys


def _file_keys(path: str, keys: dict[str, str], baseline: CfgNode) -> None:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    bases = data.pop("_BASE_", [])
    zoo = os.path.dirname(os.path.realpath(model_zoo_path("Base-RCNN-FPN.yaml")))
    for base in [bases] if isinstance(bases, str) else bases:
        if base.startswith(MODEL_ZOO_PREFIX):
            base = model_zoo_path(base[len(MODEL_ZOO_PREFIX) :])
        base = os.path.join(os.path.dirname(path), os.path.expanduser(base))
        if os.path.realpath(base).startswith(zoo + os.sep):
            baseline.merge_from_file(base)
        else:
            _file_keys(base, keys, baseline)
    keys.update({key: path for key in flatten_dict(data)})
