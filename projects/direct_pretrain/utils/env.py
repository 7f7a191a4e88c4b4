"""What the installed detectron2 can do."""

from __future__ import annotations

import functools

__all__ = ["check_cpp_requirements", "has_cpp_ops", "require_cpp_ops"]


@functools.lru_cache(maxsize=None)
def has_cpp_ops() -> bool:
    """Whether detectron2 was built with its C++ extension (``detectron2._C``)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def require_cpp_ops(feature: str, key: str) -> None:
    """Raise a clear error if ``feature`` (asked for by config ``key``) needs the C++ ops."""
    if not has_cpp_ops():
        raise RuntimeError(
            f"{key}: {feature} needs detectron2's C++ ops, and this detectron2 was installed "
            "without them (the registry copy has no C++ sources). Build detectron2 from its "
            "source repository to use it, or change the config."
        )


def check_cpp_requirements(cfg) -> None:
    """Refuse, with the config key, a model that needs the C++ ops when they are not built."""
    model = cfg.MODEL
    needs = [
        (
            "deformable convolution",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            any(model.RESNETS.DEFORM_ON_PER_STAGE),
        ),
        (
            "rotated proposals (RRPN)",
            "MODEL.PROPOSAL_GENERATOR.NAME",
            model.PROPOSAL_GENERATOR.NAME == "RRPN",
        ),
        ("rotated RoI heads", "MODEL.ROI_HEADS.NAME", model.ROI_HEADS.NAME == "RROIHeads"),
        (
            "rotated RoIAlign",
            "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
            model.ROI_BOX_HEAD.POOLER_TYPE == "ROIAlignRotated",
        ),
        (
            "rotated anchors",
            "MODEL.ANCHOR_GENERATOR.NAME",
            model.ANCHOR_GENERATOR.NAME == "RotatedAnchorGenerator",
        ),
    ]
    for feature, key, asked in needs:
        if asked:
            require_cpp_ops(feature, key)
