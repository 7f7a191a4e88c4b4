"""A DetectionCheckpointer with atomic writes and weights-only loading."""

from __future__ import annotations

import logging
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.io import atomic_torch_save, atomic_write_text

__all__ = ["SafeCheckpointer"]

logger = logging.getLogger(__name__)


class SafeCheckpointer(DetectionCheckpointer):
    """Checkpoints that are never half-written and loaded without running pickled code.

    * ``save`` and ``last_checkpoint`` go to a temporary name, are fsynced, then renamed: a run
      killed while saving leaves the previous checkpoint and a ``last_checkpoint`` pointing to
      it, and a partial file is never loaded. Non-finite weights are never saved.
    * ``.pth`` files are loaded with ``torch.load(weights_only=True)``. Detectron2's legacy
      ``.pkl`` model-zoo files need pickle; they are loaded only when named explicitly (e.g. in
      ``MODEL.WEIGHTS``), with a warning.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = self.model.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:  # never let a diverged model become the "last good" checkpoint
            raise FloatingPointError(
                f"not saving checkpoint '{name}': non-finite weights in {bad[:3]} "
                f"({len(bad)} tensors); training has diverged"
            )
        data = {"model": state}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        self.logger.info("Saving checkpoint to %s", os.path.join(self.save_dir, basename))
        atomic_torch_save(data, os.path.join(self.save_dir, basename))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str) -> dict:
        if filename.endswith(".pkl"):
            logger.warning(
                "Loading %s with pickle (a legacy Detectron2 format): pickle can run "
                "code, load only files you trust.",
                filename,
            )
            return super()._load_file(filename)
        try:
            with open(filename, "rb") as f:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"'{filename}' holds objects other than tensors and plain containers; they are "
                "not unpickled (weights_only loading). Re-save its state dict if you trust it."
            ) from e
        return loaded if "model" in loaded else {"model": loaded}
