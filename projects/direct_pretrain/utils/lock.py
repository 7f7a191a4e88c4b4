"""One run per output folder: an exclusive lock held by the main process for the whole run."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from .errors import UserError

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunLockedError(UserError, RuntimeError):
    """Another process holds the output folder's lock."""


class RunLock:
    """``OUTPUT_DIR/.run.lock``: an exclusive ``flock`` plus who holds it (host, PID, start).

    The operating system releases the lock when its process ends, however it ends, so a lock
    left by a killed run is taken over (with a line saying so). ``flock`` is local to a machine
    on some network file systems: two machines sharing a folder over NFS may not see each
    other's lock.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({_describe(holder)}). Wait for it "
                "to end, or give this run another OUTPUT_DIR."
            ) from None
        earlier = _holder(handle)
        if earlier:
            logger.warning(
                "Taking over the lock of %s: the run that held it (%s) ended without releasing "
                "it (killed?).",
                self.path.parent,
                _describe(earlier),
            )
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
        )
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Clear the holder and release the lock (idempotent)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (
        f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')}"
    )
