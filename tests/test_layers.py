"""The package's import contracts (pyproject.toml [tool.importlinter]) hold, and break on an
upward import, also one hidden inside a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
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


def test_every_module_of_the_package_has_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    package = ROOT / "projects" / "direct_pretrain"
    modules = {
        f"direct_pretrain.{p.stem}"
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert modules - placed == set(), "add these modules to a layer in pyproject.toml"


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
