"""The package's import contracts (pyproject.toml [tool.importlinter]) hold, and break on an
upward import, also one hidden inside a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=package_parent,
    )


def test_import_contracts_hold():
    result = _lint(ROOT / "projects")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    shutil.copytree(
        ROOT / "projects" / "direct_pretrain",
        tmp_path / "direct_pretrain",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    images = tmp_path / "direct_pretrain" / "data" / "images.py"
    images.write_text(
        images.read_text() + "\n\ndef _late():\n    from ..pipeline import run_pipeline\n"
    )
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "direct_pretrain.data is not allowed to import direct_pretrain.pipeline" in (
        result.stdout
    )
