"""A DetectionCheckpointer with atomic, checksummed writes, a finiteness check, weights-only
loading and resumption from the newest undamaged checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Iterator
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .utils.errors import UserError
from .utils.io import atomic_open, atomic_write_text, tensor_bytes

__all__ = [
    "DamagedCheckpointError",
    "SafeCheckpointer",
    "checksum_path",
    "file_sha256",
    "resume_iteration",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
DAMAGED_SUFFIX = ".damaged"
# The names Detectron2's PeriodicCheckpointer (and the graceful stop) give checkpoints.
_CHECKPOINT_NAME = re.compile(r"model_(\d+|final)\.pth")


class DamagedCheckpointError(UserError, RuntimeError):
    """A checkpoint differs from the checksum recorded when it was written, or cannot be read."""


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of the checkpoint ``path`` is recorded: ``<path>.sha256``."""
    return Path(f"{path}{CHECKSUM_SUFFIX}")


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of the bytes of ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def checksummed_open(
    path: str | os.PathLike, min_size: Callable[[], int] | None = None
) -> Iterator[IO]:
    """:func:`atomic_open` for binary writing that then records the file's sha256 in
    ``<path>.sha256`` (``sha256sum`` format, also written atomically). The old record goes
    first, so a record never describes other bytes than the file's."""
    checksum_path(path).unlink(missing_ok=True)
    with atomic_open(path, "wb", min_size=min_size) as f:
        yield f
    atomic_write_text(checksum_path(path), f"{file_sha256(path)}  {Path(path).name}\n")


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check ``path`` against its recorded checksum.

    Returns:
        True if it matches; False if no checksum is recorded (a file written before checksums
        were, or by something else), which is left to the loader.

    Raises:
        DamagedCheckpointError: the checksum differs, or the file or its record cannot be read.
    """
    record = checksum_path(path)
    if not record.exists():
        return False
    try:
        recorded, actual = record.read_text().split()[0], file_sha256(path)
    except (OSError, IndexError) as e:
        raise DamagedCheckpointError(f"checkpoint '{path}' cannot be checked: {e}") from e
    if actual != recorded:
        raise DamagedCheckpointError(
            f"checkpoint '{path}' is damaged: its sha256 differs from the one recorded in "
            f"{record.name} when it was written"
        )
    return True


def _set_aside(path: str) -> str:
    """Rename ``path`` (and its checksum record) to a free ``<path>.damaged[.N]``; return it."""
    target, n = f"{path}{DAMAGED_SUFFIX}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{DAMAGED_SUFFIX}.{n}"
    os.replace(path, target)
    record = checksum_path(path)
    if record.exists():
        os.replace(record, checksum_path(target))
    return target


def _age(name: str) -> float:
    """Order of a checkpoint name: its iteration; ``model_final`` and other names last."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match[1]) if match and match[1] != "final" else math.inf


class _AtomicWrites:
    """A path manager that writes local files atomically (binary ones with their checksum
    recorded) and passes everything else on.

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
        if mode not in ("w", "wb") or "://" in str(path):
            return self._path_manager.open(path, mode, **kwargs)
        if mode == "w":
            return atomic_open(path, mode)
        min_size = self._checkpoint_bytes if str(path).endswith(".pth") else None
        return checksummed_open(path, min_size)

    def rm(self, path: str, **kwargs) -> None:
        """Delete ``path`` and its checksum record (``max_to_keep`` deletes old checkpoints)."""
        self._path_manager.rm(path, **kwargs)
        if "://" not in str(path):
            checksum_path(path).unlink(missing_ok=True)


class SafeCheckpointer(DetectionCheckpointer):
    """Checkpoints that are never half-written, never diverged, and loaded without running
    pickled code.

    * Checkpoints and ``last_checkpoint`` are written by fvcore's ``Checkpointer.save`` through
      :attr:`path_manager`, which writes a temporary file, fsyncs it and renames it: a run killed
      while saving leaves the previous checkpoint and a ``last_checkpoint`` pointing to it. A
      full disk raises :class:`~direct_pretrain.utils.io.DiskFullError`, keeping them too.
    * The sha256 of each checkpoint is recorded in ``<checkpoint>.sha256`` before
      ``last_checkpoint`` names it. :meth:`resume_or_load` checks it: a damaged checkpoint is
      set aside (renamed ``<checkpoint>.damaged``, never deleted) and the phase resumes from the
      newest good one, or from its initial weights if none is left. Checkpoints without a
      record (written before records were kept) are loaded unchecked.
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

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """fvcore's ``resume_or_load``, from the newest checkpoint that is not damaged."""
        if resume:
            if comm.is_main_process() and self.has_checkpoint():
                settle_checkpoints(self.save_dir)
            comm.synchronize()
        return super().resume_or_load(path, resume=resume)


def settle_checkpoints(folder: str) -> None:
    """Set aside damaged checkpoints in ``folder`` from the last one back to the newest good
    one and tag that one as the last; with none good, remove ``last_checkpoint`` (a fresh
    start). Call it on the main process; a second call finds nothing to do."""
    tag = os.path.join(folder, "last_checkpoint")
    if not os.path.isfile(tag):
        return
    last = Path(tag).read_text().strip()
    older = sorted((n for n in os.listdir(folder) if _age(n) < _age(last)), key=_age, reverse=True)
    passed = []
    for name in [last, *older]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            logger.warning("Checkpoint '%s' is missing.", path)
            passed.append(f"{name} (missing)")
            continue
        try:
            checked = verify_checkpoint(path)
        except DamagedCheckpointError as e:
            target = _set_aside(path)
            logger.warning("%s; setting it aside as %s.", e, target)
            passed.append(f"{name} -> {os.path.basename(target)}")
            continue
        if not checked:
            logger.info("%s has no recorded checksum: loading it unchecked.", path)
        if passed:
            logger.warning(
                "Resuming from %s, the newest good checkpoint, instead of %s.", path, last
            )
            atomic_write_text(tag, name)
        return
    os.remove(tag)
    logger.warning(
        "No good checkpoint is left in %s (%s): the phase restarts from its initial weights.",
        folder,
        ", ".join(passed),
    )


def resume_iteration(folder: str) -> int:
    """The iteration ``resume_or_load(resume=True)`` starts at in ``folder``: the one after
    that of the newest good checkpoint (damaged ones set aside first, by the main process), 0
    without one (read memory-mapped, so the weights are not read)."""
    if comm.is_main_process():
        settle_checkpoints(folder)
    comm.synchronize()
    last = Path(folder) / "last_checkpoint"
    path = Path(folder) / last.read_text().strip() if last.is_file() else None
    if path is None or not path.is_file():
        return 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint.get("iteration", -1)) + 1
