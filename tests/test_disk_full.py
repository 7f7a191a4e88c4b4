"""A full disk while a file is written: one clear error, no partial file, the old file kept."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from direct_pretrain.checkpoint import SafeCheckpointer
from direct_pretrain.utils import io as dp_io
from direct_pretrain.utils.io import (
    DiskFullError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)

ADVICE = "free space or move the run folder; rerun to continue"


@pytest.fixture
def fill_disk(monkeypatch):
    """``fill_disk(free, code)``: from now on the files that atomic_open opens share ``free``
    bytes of disk; a raw write beyond them fails with ``code``, as write(2) does."""

    def fill(free: int, code: int = errno.ENOSPC) -> None:
        class FullDisk(io.FileIO):
            def write(self, data) -> int:
                nonlocal free
                data = memoryview(data).cast("B")
                if free == 0 and len(data):
                    raise OSError(code, os.strerror(code))
                written = super().write(data[:free])
                free -= written
                return written

        def open_on_full_disk(file, mode="r", encoding=None):
            binary = io.BufferedWriter(FullDisk(file, mode.replace("b", "")))
            return binary if "b" in mode else io.TextIOWrapper(binary, encoding)

        monkeypatch.setattr(dp_io, "open", open_on_full_disk, raising=False)

    return fill


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _message(path, needed: str) -> str:
    return (
        rf"^No space left on device while writing {re.escape(str(path))} "
        rf"\({needed} MB needed, [\d.]+ MB free\): {re.escape(ADVICE)}$"
    )


def test_torch_save_on_full_disk(tmp_path, fill_disk):
    """torch's RuntimeError ('unexpected pos') from the ENOSPC of its writer becomes one error;
    the earlier file at that path is kept and no temporary file is left."""
    path = tmp_path / "model.pth"
    atomic_torch_save({"w": torch.ones(10)}, path)
    fill_disk(free=1000)
    state = {"w": torch.arange(10_000.0), "view": None}  # 40 kB: more than the write buffer
    state["view"] = state["w"][:10]  # shares its storage: counted once
    with pytest.raises(DiskFullError, match=_message(path, r"at least 0\.040")) as caught:
        atomic_torch_save(state, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert isinstance(caught.value, OSError)
    assert any("unexpected pos" in str(e) for e in _chain(caught.value))  # torch's error
    assert _files(tmp_path) == ["model.pth"]
    assert torch.equal(torch.load(path)["w"], torch.ones(10))


def test_text_on_full_disk_says_exact_size(tmp_path, fill_disk):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"old": 1})
    fill_disk(free=1000)
    with pytest.raises(DiskFullError, match=_message(path, r"0\.005")):
        atomic_write_text(path, "x" * 4500)  # partly written, then ENOSPC
    assert _files(tmp_path) == ["summary.json"]
    assert json.loads(path.read_text()) == {"old": 1}


def test_quota_exceeded(tmp_path, fill_disk):
    fill_disk(free=0, code=errno.EDQUOT)
    quota = r"^Disk quota exceeded while writing .*a\.json \("
    with pytest.raises(DiskFullError, match=quota) as caught:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
    assert caught.value.errno == errno.EDQUOT
    assert _files(tmp_path) == []


def test_disk_full_at_fsync(tmp_path, monkeypatch):
    """Some file systems (NFS, delayed allocation) report ENOSPC only when data is flushed."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dp_io.os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=r"at least 0\.001 MB needed"):
        atomic_write(tmp_path / "a.txt", lambda f: f.write(b"hi"))  # size unknown
    assert _files(tmp_path) == []


def test_other_write_errors_pass_unchanged(tmp_path, fill_disk):
    fill_disk(free=0, code=errno.EIO)
    with pytest.raises(OSError) as caught:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
    assert type(caught.value) is OSError and caught.value.errno == errno.EIO
    assert _files(tmp_path) == []


def test_checkpointer_on_full_disk_keeps_last_checkpoint(tmp_path, fill_disk):
    model = torch.nn.Linear(100, 100)  # 40,400 bytes of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 100)).sum().backward()
    optimizer.step()  # momentum buffers: 40,400 bytes more
    checkpointer = SafeCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000000")
    fill_disk(free=2000)
    needed = _message(tmp_path / "model_0000001.pth", r"at least 0\.081")
    with pytest.raises(DiskFullError, match=needed):
        checkpointer.save("model_0000001")
    assert _files(tmp_path) == ["last_checkpoint", "model_0000000.pth", "model_0000000.pth.sha256"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert torch.equal(torch.load(tmp_path / "model_0000000.pth")["model"]["weight"], model.weight)


TMPFS_SCRIPT = """
import json, os, sys, torch
from direct_pretrain.utils.io import DiskFullError, atomic_torch_save
folder = sys.argv[1]
path = os.path.join(folder, "model.pth")
atomic_torch_save({"w": torch.ones(10_000)}, path)  # 40 kB: fits
try:
    atomic_torch_save({"w": torch.zeros(1_000_000)}, path)  # 4 MB: does not
    error = None
except DiskFullError as e:
    chain, cause = [], e.__cause__
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    error = [e.errno, str(e), chain]
print(json.dumps({"error": error, "files": sorted(os.listdir(folder)),
                  "kept": torch.equal(torch.load(path)["w"], torch.ones(10_000))}))
"""


def _in_tmpfs(folder, *command: str) -> subprocess.CompletedProcess:
    """Run ``command`` in a user and mount namespace with a 1 MB tmpfs mounted on ``folder``."""
    mount = f'mount -t tmpfs -o size=1m tmpfs "{folder}" && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, "sh", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_real_full_tmpfs(tmp_path):
    """A real full file system (skipped where unprivileged namespaces are not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not shutil.which("unshare") or _in_tmpfs(mount, "true").returncode:
        pytest.skip("cannot mount a tmpfs in a user and mount namespace (unshare -rm)")
    script = tmp_path / "fill.py"
    script.write_text(TMPFS_SCRIPT)
    done = _in_tmpfs(mount, sys.executable, str(script), str(mount))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    code, message, chain = result["error"]
    assert code == errno.ENOSPC and any("unexpected pos" in c for c in chain), chain
    assert re.match(_message(mount / "model.pth", r"at least 4\.0"), message), message
    assert result["files"] == ["model.pth"] and result["kept"]
