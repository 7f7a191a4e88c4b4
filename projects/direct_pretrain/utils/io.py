"""Crash-safe file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

from .errors import UserError

__all__ = [
    "DiskFullError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "ensure_writable_dir",
    "file_signature",
    "flatten_dict",
    "plain",
    "remove_partial_files",
    "tensor_bytes",
]

_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


class DiskFullError(UserError, OSError):
    """The disk, or the user's quota, filled up while a file was written (``errno`` ENOSPC or
    EDQUOT); the message names the file, the space needed and free, and what to do."""

    def __str__(self) -> str:
        return self.strerror


def _disk_full_errno(error: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT if ``error`` or an error it was raised from or while handling is one:
    by ``errno``, or by message for an error that quotes it without chaining it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error.errno
        for code, message in _DISK_FULL.items():
            if message in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


def _mb(size: float) -> str:
    return f"{size / 1e6:.{1 if size >= 100_000 else 3}f}"


def _disk_full(path: Path, code: int, needed: int, at_least: bool) -> DiskFullError:
    """The error for a full disk while writing ``path``, ``needed`` bytes rounded up to 1 kB."""
    needed_mb = ("at least " if at_least else "") + _mb(math.ceil(needed / 1e3) * 1e3)
    free_mb = _mb(shutil.disk_usage(path.parent).free)
    return DiskFullError(
        code,
        f"{_DISK_FULL[code]} while writing {path} ({needed_mb} MB needed, {free_mb} MB free): "
        "free space or move the run folder; rerun to continue",
        str(path),
    )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in ``obj`` (nested dicts, lists and tuples), each storage
    counted once: what ``torch.save`` writes of them."""
    storages, todo = {}, [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return sum(storages.values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    size: int | None = None,
    min_size: Callable[[], int] | None = None,
) -> Iterator[IO]:
    """A file to write ``path`` with (``mode`` "wb" or "w"): a temporary file beside it,
    fsynced and renamed to ``path`` when the block ends, deleted if it raises.

    If the disk or quota is full it raises :class:`DiskFullError` (``path`` keeps its earlier
    content) saying how much space is needed: ``size``, the bytes the file takes if known, else
    at least ``min_size()`` or the bytes written, whichever is more.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open({str(path)!r}): mode {mode!r} is not 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        with open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException as e:
        code = _disk_full_errno(e)
        written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if code is None:
            raise
        if size is not None:
            raise _disk_full(path, code, size, at_least=False) from e
        lower_bound = max(written, min_size() if min_size else 0)
        raise _disk_full(path, code, lower_bound, at_least=True) from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[io.BufferedWriter], Any],
    *,
    size: int | None = None,
    min_size: Callable[[], int] | None = None,
) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it
    (``size``, ``min_size``: as for :func:`atomic_open`)."""
    with atomic_open(path, size=size, min_size=min_size) as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), size=len(data))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON; NaN and infinities become null."""
    atomic_write_text(path, json.dumps(_finite(obj), indent=1) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), min_size=lambda: tensor_bytes(obj))


def ensure_writable_dir(path: str | os.PathLike, what: str = "OUTPUT_DIR") -> None:
    """Create ``path`` if needed and check that files can be written there."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f"{what} '{path}' is not writable: {e.strerror or e}") from e


def remove_partial_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that interrupted atomic writes left in ``folder``."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def flatten_dict(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def plain(value: Any) -> Any:
    """``value`` with every sequence (tuple, OmegaConf ListConfig) as a list and every mapping as
    a dict, recursively: what YAML and JSON write and what compares equal across config systems."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def file_signature(path: str | os.PathLike) -> str:
    """``size|mtime`` of a file, for cache keys that change when the file does
    ("unreadable" if it cannot be stat-ed: the pass that reads it names it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "unreadable"
    return f"{stat.st_size}|{stat.st_mtime_ns}"
