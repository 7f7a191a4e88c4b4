"""COCO evaluation restricted to the images actually evaluated when bad images are skipped, with
AP50 and AP75 per class."""

from __future__ import annotations

import itertools
import logging

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .images import BadImageError

__all__ = ["CheckedCOCOEvaluator"]

logger = logging.getLogger(__name__)
_MAX_NAMES = 10


class CheckedCOCOEvaluator(COCOEvaluator):
    """:class:`COCOEvaluator` that, with ``skip_bad_images``, scores only the images it saw, and
    adds ``AP50-<class>`` and ``AP75-<class>`` to the box results.

    With ``DIRECT_PRETRAIN.BAD_IMAGES: skip`` the evaluation mapper leaves unreadable test
    images out (:class:`~.data.mapper.CheckedDatasetMapper`); their ground truth must then be
    left out too, or it would count as missed. The left-out files are logged by name. Without
    ``skip_bad_images``, or when no image was left out, this is :class:`COCOEvaluator`.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        skip_bad_images: bool = False,
        distributed: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(dataset_name, distributed=distributed, **kwargs)
        self.dataset_name = dataset_name
        self.skip_bad_images = skip_bad_images
        self.distributed = distributed
        self.seen: list = []

    def reset(self) -> None:
        super().reset()
        self.seen = []

    def process(self, inputs, outputs) -> None:
        super().process(inputs, outputs)
        self.seen.extend(i["image_id"] for i in inputs)

    def evaluate(self, img_ids=None):
        if self.skip_bad_images and img_ids is None:
            img_ids = self._evaluated_ids()
        return super().evaluate(img_ids=img_ids)

    def _derive_coco_results(
        self, coco_eval, iou_type: str, class_names: list[str] | None = None
    ) -> dict:
        """Detectron2's results; for boxes of more than one class (where Detectron2 gives
        ``AP-<class>``) also ``AP50-<class>`` and ``AP75-<class>``, read from the same
        evaluation's precision array as Detectron2 reads ``AP-<class>`` (no second
        evaluation): the mean precision over recall at that IoU, all areas, most detections."""
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if coco_eval is None or iou_type != "bbox" or class_names is None or len(class_names) < 2:
            return results
        precisions = coco_eval.eval["precision"]  # (IoU, recall, class, area range, max dets)
        for iou in (50, 75):
            t = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - iou / 100)))
            for k, name in enumerate(class_names):
                precision = precisions[t, :, k, 0, -1]
                precision = precision[precision > -1]
                ap = float(np.mean(precision)) * 100 if precision.size else float("nan")
                results[f"AP{iou}-{name}"] = ap
        return results

    def _evaluated_ids(self) -> list | None:
        """The image ids evaluated (all processes), or None if that is the whole dataset."""
        parts = comm.all_gather(self.seen) if self.distributed else [self.seen]
        seen = set(itertools.chain(*parts))
        names = {d["image_id"]: d["file_name"] for d in DatasetCatalog.get(self.dataset_name)}
        left_out = sorted(names[i] for i in names.keys() - seen)
        if not left_out:
            return None
        if not seen:
            raise BadImageError(
                f"dataset '{self.dataset_name}': all {len(names)} images were left out as bad "
                f"images (first: {left_out[0]}); nothing to evaluate"
            )
        more = f" and {len(left_out) - _MAX_NAMES} more" if len(left_out) > _MAX_NAMES else ""
        logger.warning(
            "COCO evaluation of '%s' restricted to the %d of %d images evaluated; left out "
            "(BAD_IMAGES skip): %s%s",
            self.dataset_name,
            len(seen),
            len(names),
            ", ".join(left_out[:_MAX_NAMES]),
            more,
        )
        return sorted(seen)
