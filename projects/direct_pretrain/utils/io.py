"""Crash-safe file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "ensure_writable_dir",
    "file_signature",
    "flatten_dict",
    "remove_partial_files",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file to write ``path`` with (``mode`` "wb" or "w"): a temporary file beside it,
    fsynced and renamed to ``path`` when the block ends, deleted if it raises."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open({str(path)!r}): mode {mode!r} is not 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it."""
    with atomic_open(path) as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
    atomic_write(path, lambda f: torch.save(obj, f))


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


def file_signature(path: str | os.PathLike) -> str:
    """``size|mtime`` of a file, for cache keys that change when the file does
    ("unreadable" if it cannot be stat-ed: the pass that reads it names it)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "unreadable"
    return f"{stat.st_size}|{stat.st_mtime_ns}"
