"""A DetectionCheckpointer with atomic writes, a finiteness check and weights-only loading."""

from __future__ import annotations

import logging
import pickle
from typing import IO, Any, Callable, ContextManager
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .utils.io import atomic_open, tensor_bytes

__all__ = ["SafeCheckpointer"]

logger = logging.getLogger(__name__)


class _AtomicWrites:
    """A path manager that writes local files atomically and passes everything else on.

    ``open`` for writing gives a context manager, as fvcore's ``Checkpointer`` uses it; if the
    disk fills up, a ``.pth`` file's :class:`DiskFullError` says it needs at least
    ``checkpoint_bytes()``.
    """

    def __init__(self, path_manager, checkpoint_bytes: Callable[[], int]) -> None:
        self._path_manager = path_manager
        self._checkpoint_bytes = checkpoint_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._path_manager, name)

    def open(self, path: str, mode: str = "r", **kwargs) -> IO | ContextManager[IO]:
        if mode in ("w", "wb") and "://" not in str(path):
            min_size = self._checkpoint_bytes if str(path).endswith(".pth") else None
            return atomic_open(path, mode, min_size=min_size)
        return self._path_manager.open(path, mode, **kwargs)


class SafeCheckpointer(DetectionCheckpointer):
    """Checkpoints that are never half-written, never diverged, and loaded without running
    pickled code.

    * Checkpoints and ``last_checkpoint`` are written by fvcore's ``Checkpointer.save`` through
      :attr:`path_manager`, which writes a temporary file, fsyncs it and renames it: a run killed
      while saving leaves the previous checkpoint and a ``last_checkpoint`` pointing to it. A
      full disk raises :class:`~direct_pretrain.utils.io.DiskFullError`, keeping them too.
    * Non-finite weights are never saved. In a multi-process run :meth:`save` is collective:
      every process calls it, and if the weights of any one are non-finite, every one raises.
    * ``.pth`` files are loaded by ``torch.load`` with its ``weights_only`` default (torch 2.6
      and later). Detectron2's legacy ``.pkl`` model-zoo files need pickle; they are loaded
      only when named explicitly (e.g. in ``MODEL.WEIGHTS``), with a warning.
    """

    def __init__(self, model, save_dir: str = "", **kwargs) -> None:
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager, self._checkpoint_bytes)

    def _checkpoint_bytes(self) -> int:
        """The bytes of the tensors a checkpoint holds: a lower bound of its size."""
        states = [self.model.state_dict(), *(c.state_dict() for c in self.checkpointables.values())]
        return tensor_bytes(states)

    def save(self, name: str, **kwargs) -> None:
        state = self.model.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        bad_by_rank = {rank: keys for rank, keys in enumerate(comm.all_gather(bad)) if keys}
        if bad_by_rank:  # never let a diverged model become the "last good" checkpoint
            keys = next(iter(bad_by_rank.values()))
            where = f" on process(es) {sorted(bad_by_rank)}" if comm.get_world_size() > 1 else ""
            raise FloatingPointError(
                f"not saving checkpoint '{name}': non-finite weights in {keys[:3]} "
                f"({len(keys)} tensors){where}; training has diverged"
            )
        super().save(name, **kwargs)

    def load(self, path: str, *args, **kwargs) -> dict:
        if path and urlparse(path).path.endswith(".pkl"):
            logger.warning(
                "Loading %s with pickle (a legacy Detectron2 format): pickle can run "
                "code, load only files you trust.",
                path,
            )
            return super().load(path, *args, **kwargs)
        try:
            return super().load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"'{path}' holds objects other than tensors and plain containers; they are "
                "not unpickled (weights_only loading). Re-save its state dict if you trust it."
            ) from e
