"""A normal (non-editable) install: the wheel holds every module and each imports from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT

PACKAGE_DIR = ROOT / "projects" / "direct_pretrain"

# Run in a fresh interpreter (``-I``: no current folder, no PYTHONPATH). Path entries that
# hold a direct_pretrain package (the checkout, through an editable install) and editable
# import hooks are dropped, so each module can only come from the installed wheel.
_IMPORT_ALL = """
import importlib, json, os, sys
target, names = sys.argv[1], json.loads(sys.argv[2])
sys.path[:] = [target] + [
    p for p in sys.path if not os.path.exists(os.path.join(p or ".", "direct_pretrain"))
]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
elsewhere = {}
for name in names:
    module = importlib.import_module(name)
    if not module.__file__.startswith(target):
        elsewhere[name] = module.__file__
print(json.dumps(elsewhere))
"""


def _module_names(package_dir: Path) -> list[str]:
    """Dotted names of the modules under ``package_dir`` (the ``direct_pretrain`` folder)."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_wheel_holds_and_imports_every_module(tmp_path):
    # Build from a copy of the build inputs: pip builds in the source folder and would leave
    # build/ and *.egg-info in the checkout.
    src = tmp_path / "src"
    copied = src / "projects" / "direct_pretrain"
    shutil.copytree(PACKAGE_DIR, copied, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    dist = tmp_path / "dist"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True
    )
    (wheel,) = dist.glob("direct_pretrain-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    in_source = {str(p.relative_to(copied.parent)) for p in copied.rglob("*.py")}
    assert in_wheel == in_source, f"{wheel.name} lacks {sorted(in_source - in_wheel)}"

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "-t", target, wheel], check=True)
    modules = _module_names(copied)
    result = subprocess.run(
        [sys.executable, "-I", "-c", _IMPORT_ALL, str(target), json.dumps(modules)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {}, "imported from outside the wheel"
    assert "direct_pretrain.aligndet.dense" in modules
