"""One run per OUTPUT_DIR: a second command is refused naming the holder; a dead holder's lock is
taken over."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from direct_pretrain.utils.lock import LOCK_FILE, RunLock, RunLockedError

from conftest import tiny_cfg, train_net, write_config

HOLD = """
import sys, time
from direct_pretrain.utils.lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(120)
"""


def _holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(
            RunLockedError, match=rf"in use by another run \(host .*, PID {proc.pid}"
        ):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_line(tmp_path, caplog):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING):
        with RunLock(tmp_path):
            assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    assert f"PID {proc.pid}" in caplog.text and "ended without releasing it" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder left
    with RunLock(tmp_path):  # and free again, with no warning this time
        pass


def test_train_net_refuses_a_folder_in_use_at_once(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    config = write_config(cfg, tmp_path / "config.yaml")
    proc = _holder(tmp_path / "run")
    try:
        start = time.perf_counter()
        result = train_net(config, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode != 0
    assert f"is in use by another run (host {socket.gethostname()}, PID {proc.pid}" in (
        result.stderr + result.stdout
    )
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing of the other run touched
    assert time.perf_counter() - start < 120
