"""The ``BOX_DOMAIN`` phase kind: everything the pipeline does differently for AlignDet."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetFromList,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.modeling import build_model

from ..bridge import BridgeError, bridge_state_dict
from ..data.datasets import cache_dir
from ..phase_kinds import PhaseConfigError, PhaseKind, register_phase_kind
from ..utils.dist import build_on_main
from ..utils.io import atomic_torch_save, atomic_write_json
from .backbone_init import convert_resnet_state, is_torchvision_resnet
from .config import add_aligndet_config
from .losses import EMAHook
from .proposals import load_proposals
from .views import TwoViewMapper

__all__ = ["BOX_DOMAIN_ARCHS", "BoxDomainPhase", "build_box_domain_loader", "transfer_drop"]

logger = logging.getLogger(__name__)

PHASE = "BOX_DOMAIN"
# Detectors with a box-domain version, and the meta-architecture that trains it.
BOX_DOMAIN_ARCHS = {
    "GeneralizedRCNN": "AlignDetRCNN",
    "RetinaNet": "AlignDetRetinaNet",
    "FCOSDetector": "AlignDetFCOS",
}
# Per detector: weights box-domain pre-training never trains (the mask head), and its final
# prediction layers, which the fine-tuned model re-initialises unless ALIGNDET.KEEP_PREDICTORS.
NOT_PRETRAINED = {"GeneralizedRCNN": (r"^roi_heads\.mask_head\.",)}
PREDICTORS = {
    "GeneralizedRCNN": (r"^roi_heads\.box_predictor\.",),
    "RetinaNet": (r"^head\.cls_score\.", r"^head\.bbox_pred\."),
    "FCOSDetector": (r"^head\.cls_score\.", r"^head\.bbox_pred\.", r"^head\.ctrness\."),
}
# FPN layers whose form depends on the FPN norm (a norm, or a bias without one).
FPN_NORM_DEPENDENT = r"^backbone\.fpn_(lateral|output)\d+\.(norm\.|bias$)"
INIT_FILE = "converted_backbone_init.pth"


def transfer_drop(box_domain_cfg: CfgNode, next_cfg: CfgNode) -> tuple[str, ...]:
    """Key patterns the bridge re-initialises when the next phase starts from box domain:
    the prediction layers, the mask head, and the FPN norms (or biases) when the next phase's
    FPN norm differs (the public box domain has none; its fine-tuning SyncBN). Both arguments
    are resolved phase configs."""
    arch = next_cfg.MODEL.META_ARCHITECTURE
    keep = next_cfg.ALIGNDET.KEEP_PREDICTORS
    drop = NOT_PRETRAINED.get(arch, ()) + (() if keep else PREDICTORS.get(arch, ()))
    if box_domain_cfg.MODEL.FPN.NORM != next_cfg.MODEL.FPN.NORM:
        drop += (FPN_NORM_DEPENDENT,)
    return drop


def build_box_domain_loader(cfg: CfgNode):
    """Two-view batches of the training images with their pseudo-boxes (labels unused)."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    proposals = load_proposals(dicts, cfg.ALIGNDET.PROPOSALS, cache_dir(cfg.DIRECT_PRETRAIN))
    dicts = [d for d in dicts if len(proposals[d["file_name"]])]
    if not dicts:
        raise ValueError(
            f"no training image of {cfg.DATASETS.TRAIN} has a pseudo-box: check "
            "ALIGNDET.PROPOSALS (MIN_SIDE, MAX_RELATIVE_SIZE, FILE)"
        )
    mapper = TwoViewMapper.from_config(cfg, proposals)
    return build_detection_train_loader(cfg, mapper=mapper, dataset=DatasetFromList(dicts))


def _init_key(cfg: CfgNode) -> str:
    """What the converted init depends on: the file (path, size, time) and the model."""
    path = os.path.abspath(cfg.MODEL.WEIGHTS)
    stat = os.stat(path) if os.path.isfile(path) else None
    parts = [path, stat and (stat.st_size, stat.st_mtime_ns), cfg.MODEL.dump(), cfg.INPUT.FORMAT]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _convert_init(cfg: CfgNode, output: str, report_file: str, key: str) -> None:
    """Write MODEL.WEIGHTS's backbone body (converted from torchvision names if needed) with
    the rest of the box-domain model freshly initialised to ``output``, and a key report."""
    path = cfg.MODEL.WEIGHTS
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise BridgeError(f"MODEL.WEIGHTS '{path}' cannot be read as a torch file: {e}") from e
    conversion = None
    if isinstance(ckpt, dict) and is_torchvision_resnet(ckpt):
        if cfg.MODEL.RESNETS.STRIDE_IN_1X1:
            raise BridgeError(
                f"MODEL.WEIGHTS '{path}' is a torchvision-style ResNet (stride in the 3x3 "
                "conv): set MODEL.RESNETS.STRIDE_IN_1X1 False"
            )
        source_state, conversion = convert_resnet_state(ckpt, cfg.INPUT.FORMAT)
    else:
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
        source_state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_model(cfg.clone()).cpu()
    state, report = bridge_state_dict(
        source_state, model, select=r"^backbone\.bottom_up\.", source_name=path
    )
    atomic_torch_save({"model": state, "__author__": "direct_pretrain aligndet init"}, output)
    atomic_write_json(
        report_file,
        {
            "key": key,
            "source": os.path.abspath(path),
            "conversion": conversion.as_dict() if conversion else "Detectron2 names",
            "bridge": asdict(report),
        },
    )
    logger.info(
        "BOX_DOMAIN init: %d backbone weights from %s (%s), %d keys ignored; report %s",
        sum(k.startswith("backbone.bottom_up.") for k in report.loaded),
        path,
        "converted from torchvision names" if conversion else "Detectron2 names",
        len(report.ignored) + (len(conversion.ignored) if conversion else 0),
        report_file,
    )


class BoxDomainPhase(PhaseKind):
    """AlignDet's label-free box-domain pre-training."""

    evaluates = False  # the model has no classifier
    supports_lazy = False
    config_prefixes = ("ALIGNDET.",)

    def add_config(self, cfg: CfgNode, new_phase_node) -> None:
        add_aligndet_config(cfg, new_phase_node)

    def adapt_config(self, cfg: CfgNode) -> None:
        """Swap the detector for its box-domain wrapper (no mask head)."""
        arch = cfg.MODEL.META_ARCHITECTURE
        if arch not in BOX_DOMAIN_ARCHS:
            raise PhaseConfigError(
                f"MODEL.META_ARCHITECTURE = {arch}: BOX_DOMAIN pre-training supports "
                f"{', '.join(BOX_DOMAIN_ARCHS)}"
            )
        if arch == "GeneralizedRCNN":
            if cfg.MODEL.ROI_HEADS.NAME != "StandardROIHeads":
                raise PhaseConfigError(
                    f"MODEL.ROI_HEADS.NAME = {cfg.MODEL.ROI_HEADS.NAME}: BOX_DOMAIN "
                    "pre-training supports StandardROIHeads (one box head)"
                )
            cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = cfg.ALIGNDET.RPN_BATCH_SIZE_PER_IMAGE
            cfg.MODEL.RPN.POSITIVE_FRACTION = cfg.ALIGNDET.RPN_POSITIVE_FRACTION
            cfg.MODEL.MASK_ON = False
        cfg.MODEL.META_ARCHITECTURE = BOX_DOMAIN_ARCHS[arch]

    def build_train_loader(self, cfg: CfgNode):
        return build_box_domain_loader(cfg)

    def hooks(self, cfg: CfgNode) -> list:
        return [EMAHook(cfg.ALIGNDET.MOMENTUM)]

    def prepare_weights(self, cfg: CfgNode) -> CfgNode:
        """The backbone body of MODEL.WEIGHTS (a Detectron2 checkpoint, or a torchvision/MoCo-
        style ResNet ``.pth``, converted) as a box-domain checkpoint."""
        if cfg.MODEL.WEIGHTS.endswith(".pkl"):
            return cfg  # .pkl (Detectron2/Caffe2 model zoo): Detectron2 converts it
        output = os.path.join(cfg.OUTPUT_DIR, INIT_FILE)
        report = output.replace(".pth", "_report.json")

        def convert() -> None:
            key = _init_key(cfg)
            if os.path.isfile(report) and os.path.isfile(output):
                if json.loads(Path(report).read_text()).get("key") == key:
                    return
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            _convert_init(cfg, output, report, key)

        build_on_main(convert, f"converting MODEL.WEIGHTS '{cfg.MODEL.WEIGHTS}'")
        out = cfg.clone()
        out.defrost()
        out.MODEL.WEIGHTS = output
        out.freeze()
        return out

    def transfer_drop(self, own_cfg: CfgNode, next_cfg: CfgNode) -> tuple[str, ...]:
        return transfer_drop(own_cfg, next_cfg)


register_phase_kind(PHASE, BoxDomainPhase())
