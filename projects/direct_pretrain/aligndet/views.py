"""Two independently augmented views of an image, with its pseudo-boxes following each view."""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from PIL import Image, ImageEnhance, ImageOps

from .proposals import max_per_image

__all__ = [
    "MAX_MAGNITUDE",
    "PHOTOMETRIC_OPS",
    "PhotometricTransform",
    "RandomPhotometric",
    "TwoViewMapper",
]


def _enhance(kind) -> Callable[[Image.Image, int], Image.Image]:
    # Enhancement factor 0.1 + 1.8 m / 10: 0.28 to 1.72 for m = 1..9.
    return lambda image, m: kind(image).enhance(0.1 + 1.8 * m / MAX_MAGNITUDE)


# The public code's photometric operations (its ``OneOf`` of RandAug ops): one is applied to
# each view with an integer magnitude ``m`` drawn from 1..9 (of MAX_MAGNITUDE 10) per view.
MAX_MAGNITUDE = 10
PHOTOMETRIC_OPS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "identity": lambda image, m: image,
    "autocontrast": lambda image, m: ImageOps.autocontrast(image),
    "equalize": lambda image, m: ImageOps.equalize(image),
    # Pixels at or above the threshold int(256 m / 10) (25 to 230) are inverted.
    "solarize": lambda image, m: ImageOps.solarize(image, min(256 * m // MAX_MAGNITUDE, 255)),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    # 4 - int(4 m / 10) bits kept: 4 to 1.
    "posterize": lambda image, m: ImageOps.posterize(image, 4 - 4 * m // MAX_MAGNITUDE),
}


class PhotometricTransform(T.Transform):
    """A named PIL photometric operation on the image; boxes and coordinates are unchanged."""

    def __init__(self, op: str, magnitude: int) -> None:
        super().__init__()
        self.op = op
        self.magnitude = magnitude

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(np.ascontiguousarray(img[:, :, ::-1]))  # BGR -> RGB
        return np.asarray(PHOTOMETRIC_OPS[self.op](pil, self.magnitude))[:, :, ::-1].copy()

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords


class RandomPhotometric(T.Augmentation):
    """One operation drawn uniformly from ``PHOTOMETRIC_OPS``, magnitude uniform in 1..9."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        op = random.choice(sorted(PHOTOMETRIC_OPS))
        return PhotometricTransform(op, random.randint(1, MAX_MAGNITUDE - 1))


class TwoViewMapper:
    """Maps a dataset dict to ``{"view1": ..., "view2": ...}``, each a model input with
    ``instances.gt_boxes`` holding the image's pseudo-boxes in that view's geometry.

    Box ``i`` of view 1 and box ``i`` of view 2 are the same pseudo-box (one instance); boxes
    not wider and taller than ``min_box_size`` in either view are dropped from both. Only the
    first ``max_boxes`` pseudo-boxes of an image are used (0: all).
    """

    def __init__(
        self,
        proposals: dict[str, np.ndarray],
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        min_box_size: float,
        max_boxes: int = 0,
    ) -> None:
        self.proposals = proposals
        self.max_boxes = max_boxes
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.min_box_size = min_box_size

    @classmethod
    def from_config(cls, cfg: CfgNode, proposals: dict[str, np.ndarray]) -> "TwoViewMapper":
        view = cfg.ALIGNDET.VIEW
        augs = [
            T.ResizeShortestEdge(tuple(view.MIN_SIZE_TRAIN), view.MAX_SIZE_TRAIN, "choice"),
            T.RandomFlip(horizontal=True, vertical=False),
        ]
        if view.PHOTOMETRIC:
            augs.append(RandomPhotometric())
        return cls(proposals, augs, cfg.INPUT.FORMAT, view.MIN_BOX_SIZE, max_per_image(cfg))

    def _view(self, image: np.ndarray, boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        aug_input = T.AugInput(image, boxes=boxes.copy())
        self.augmentations(aug_input)
        out = aug_input.image
        h, w = out.shape[:2]
        moved = aug_input.boxes.reshape(-1, 4).copy()
        moved[:, [0, 2]] = moved[:, [0, 2]].clip(0, w)
        moved[:, [1, 3]] = moved[:, [1, 3]].clip(0, h)
        return torch.as_tensor(np.ascontiguousarray(out.transpose(2, 0, 1))), moved

    def __call__(self, dataset_dict: dict) -> dict:
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        boxes = self.proposals[dataset_dict["file_name"]]
        if self.max_boxes > 0:
            boxes = boxes[: self.max_boxes]
        (img1, boxes1), (img2, boxes2) = self._view(image, boxes), self._view(image, boxes)
        keep = np.ones(len(boxes), dtype=bool)
        for b in (boxes1, boxes2):
            keep &= np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) > self.min_box_size
        # width/height: read by Detectron2's aspect-ratio grouping of the loader.
        out = {
            "file_name": dataset_dict["file_name"],
            "height": img1.shape[1],
            "width": img1.shape[2],
        }
        for name, img, b in (("view1", img1, boxes1), ("view2", img2, boxes2)):
            instances = Instances(tuple(img.shape[1:]))
            instances.gt_boxes = Boxes(torch.as_tensor(b[keep], dtype=torch.float32))
            instances.gt_classes = torch.zeros(int(keep.sum()), dtype=torch.int64)
            out[name] = {
                "image": img,
                "instances": instances,
                "height": img.shape[1],
                "width": img.shape[2],
            }
        return out
