"""Dataset mapper that reads with the project's checked reader, or skips bad images when asked."""

from __future__ import annotations

import copy
import logging
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .images import BAD_IMAGES_HINT, BadImageError, check_image_size, read_image_checked

__all__ = ["BadImageError", "CheckedDatasetMapper", "SKIPPED_IMAGE", "WithoutSkipped"]

logger = logging.getLogger(__name__)

# Unreadable images in a row after which even "skip" gives up (the data is likely broken).
MAX_CONSECUTIVE_SKIPS = 20
# Key of the stand-in an evaluation mapper returns for a skipped image (see WithoutSkipped).
SKIPPED_IMAGE = "skipped_image"


class CheckedDatasetMapper(DatasetMapper):
    """:class:`DatasetMapper` reading with :func:`~.images.read_image_checked`.

    Images are converted correctly (16-bit, palette, CMYK, EXIF orientation) and checked
    against the dataset's width/height before any augmentation; a bad image is a
    :class:`BadImageError` naming the file. With ``skip_bad_images``
    (``DIRECT_PRETRAIN.BAD_IMAGES: skip``) a bad image is logged and counted (``skipped``, per
    loader worker) and, in training, replaced by a random other image of ``fallback`` (drawn
    from Python's global generator, like the augmentations, which
    :mod:`~direct_pretrain.data.resumable` seeds per sample); in evaluation it becomes a
    stand-in that :class:`WithoutSkipped` removes from the batches.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        skip_bad_images: bool = False,
        fallback: Sequence[dict] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(is_train, **kwargs)
        self.skip_bad_images = skip_bad_images
        self.fallback = fallback
        self.skipped = 0

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        return {
            **super().from_config(cfg, is_train),
            "skip_bad_images": cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip",
        }

    def __call__(self, dataset_dict: dict) -> dict:
        last = None
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            try:
                return self._map(dataset_dict)
            except BadImageError as e:
                last = e
                can_skip = self.skip_bad_images and (not self.is_train or self.fallback is not None)
                if not can_skip:
                    raise type(e)(f"{e}. {BAD_IMAGES_HINT}.") from e
                self.skipped += 1
                logger.warning(
                    "Skipping bad image (%s); %d skipped so far in this loader worker.",
                    e,
                    self.skipped,
                )
                if not self.is_train:
                    return {**_identity(dataset_dict), SKIPPED_IMAGE: str(e)}
                dataset_dict = self.fallback[random.randrange(len(self.fallback))]
        raise BadImageError(
            f"{MAX_CONSECUTIVE_SKIPS} bad images in a row (last: {last}); is the image folder "
            "right?"
        )

    def _map(self, dataset_dict: dict) -> dict:
        """DatasetMapper's mapping, with the checked reader and size check."""
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        name = dataset_dict["file_name"]
        image = read_image_checked(name, self.image_format)
        if "width" in dataset_dict or "height" in dataset_dict:
            check_image_size(name, image, dataset_dict["width"], dataset_dict["height"])
        dataset_dict.setdefault("width", image.shape[1])
        dataset_dict.setdefault("height", image.shape[0])
        sem_seg = dataset_dict.pop("sem_seg_file_name", None)
        sem_seg_gt = None if sem_seg is None else utils.read_image(sem_seg, "L").squeeze(2)

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


def _identity(dataset_dict: dict) -> dict:
    return {k: dataset_dict[k] for k in ("file_name", "image_id") if k in dataset_dict}


class WithoutSkipped:
    """An evaluation loader whose batches leave out the stand-ins of skipped images.

    Its length is the wrapped loader's (the batches planned), as ``inference_on_dataset``
    expects; batches that held only skipped images are left out.
    """

    def __init__(self, loader: Iterable[list[dict]]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.loader:
            kept = [d for d in batch if SKIPPED_IMAGE not in d]
            if kept:
                yield kept
