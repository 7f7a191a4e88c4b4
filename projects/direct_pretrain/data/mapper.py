"""Dataset mapper that names the image it could not read, or skips it when asked to."""

from __future__ import annotations

import logging
import random
from typing import Sequence

from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetMapper

__all__ = ["BadImageError", "CheckedDatasetMapper"]

logger = logging.getLogger(__name__)

# Unreadable images in a row after which even "skip" gives up (the data is likely broken).
MAX_CONSECUTIVE_SKIPS = 20


class BadImageError(RuntimeError):
    """An image of the dataset cannot be read or decoded."""


class CheckedDatasetMapper(DatasetMapper):
    """:class:`DatasetMapper` whose read errors name the file.

    With ``skip_bad_images`` (``DIRECT_PRETRAIN.BAD_IMAGES: skip``) and a ``fallback`` dataset
    (training only), an unreadable image is logged, counted (``skipped``, per loader worker)
    and replaced by a random other image of ``fallback``. Evaluation never skips: a missing
    image would change the AP.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        skip_bad_images: bool = False,
        fallback: Sequence[dict] | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(is_train, **kwargs)
        self.skip_bad_images = skip_bad_images
        self.fallback = fallback
        self.skipped = 0
        self._rng = random.Random(seed)

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True) -> dict:
        return {
            **super().from_config(cfg, is_train),
            "skip_bad_images": cfg.DIRECT_PRETRAIN.BAD_IMAGES == "skip",
            "seed": cfg.SEED,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            try:
                return super().__call__(dataset_dict)
            except (OSError, SyntaxError, ValueError) as e:
                name = dataset_dict.get("file_name", "<no file_name>")
                if not (self.skip_bad_images and self.fallback is not None and self.is_train):
                    raise BadImageError(
                        f"cannot read image '{name}': {e}. Fix or remove it, or set "
                        "DIRECT_PRETRAIN.BAD_IMAGES skip to skip unreadable training images."
                    ) from e
                self.skipped += 1
                logger.warning(
                    "Skipping unreadable image %s (%s); %d skipped so far in this "
                    "loader worker.",
                    name,
                    e,
                    self.skipped,
                )
                dataset_dict = self.fallback[self._rng.randrange(len(self.fallback))]
        raise BadImageError(
            f"{MAX_CONSECUTIVE_SKIPS} unreadable images in a row (last: "
            f"'{name}'); is the image folder right?"
        )
