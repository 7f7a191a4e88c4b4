"""Make ``import detectron2`` work in the current Python environment.

If detectron2 is already importable (for example built from source, with its C++ ops), it is
used as it is and nothing is changed; only a copy installed by an older version of this script
(recognised by its marker module) is replaced. Otherwise this script downloads the registry sdist
``pb1-detectron2==0.6`` (upstream detectron2 v0.6 Python code without ``layers/csrc``), applies
the compatibility fixes listed in :data:`FIXES` to the unpacked copy, and installs it as the
distribution ``detectron2`` without its C++ extension. Each fix is a text replacement that must
match: if the sdist ever differs, the install stops and names the fix and the file.

Usage: ``python tools/install_detectron2.py [--force] [--work-dir DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MARKER_MODULE = "_direct_pretrain_fixes"


@dataclass(frozen=True)
class Fix:
    """One text replacement applied to the unpacked sdist.

    Attributes:
        key: short name, recorded in the installed package.
        reason: why upstream v0.6 needs it on today's stack.
        files: paths relative to the sdist root; each must contain ``pattern``.
        pattern: regular expression to replace.
        replacement: ``re.sub`` replacement text.
    """

    key: str
    reason: str
    files: tuple[str, ...]
    pattern: str
    replacement: str


_OPTIONAL_C = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # installed without the C++ extension\n"
    "    _C = None\n"
)

FIXES: tuple[Fix, ...] = (
    Fix(
        key="optional-cpp-ops",
        reason="module-level `from detectron2 import _C` fails without the C++ extension; "
        "rotated ops, deformable conv and the fast COCO evaluator become unavailable instead",
        files=(
            "detectron2/layers/deform_conv.py",
            "detectron2/layers/rotated_boxes.py",
            "detectron2/layers/roi_align_rotated.py",
            "detectron2/evaluation/fast_eval_api.py",
        ),
        pattern=r"^from detectron2 import _C\n",
        replacement=_OPTIONAL_C,
    ),
    Fix(
        key="pillow-bilinear",
        reason="Image.LINEAR was removed in Pillow 10 (upstream now uses Image.BILINEAR)",
        files=("detectron2/data/transforms/transform.py",),
        pattern=r"Image\.LINEAR\b",
        replacement="Image.BILINEAR",
    ),
    Fix(
        key="no-pkg-resources",
        reason="pkg_resources is gone from recent setuptools; the model-zoo config path is "
        "computed from the package folder instead",
        files=("detectron2/model_zoo/model_zoo.py",),
        pattern=r"import pkg_resources\n((?:.|\n)*?)cfg_file = pkg_resources\.resource_filename\(\n"
        r"\s*\"detectron2\.model_zoo\", os\.path\.join\(\"configs\", config_path\)\n\s*\)",
        replacement=r"\1cfg_file = os.path.join(os.path.dirname(__file__), "
        r'"configs", config_path)',
    ),
    Fix(
        key="numpy-aliases",
        reason="np.bool/np.int/np.float/np.str were removed in numpy 1.24",
        files=(
            "detectron2/data/build.py",
            "detectron2/data/datasets/pascal_voc.py",
            "detectron2/evaluation/pascal_voc_evaluation.py",
            "detectron2/evaluation/sem_seg_evaluation.py",
            "detectron2/structures/masks.py",
            "detectron2/utils/visualizer.py",
            "detectron2/utils/video_visualizer.py",
        ),
        pattern=r"\bnp\.(bool|int|float|str)\b(?![\w.])",
        replacement=r"\1",
    ),
    Fix(
        key="lr-scheduler-resume",
        reason="the LRScheduler hook saved/restored only `_LRScheduler` subclasses; torch's "
        "own schedulers now derive from `LRScheduler`, so their state was lost on resume",
        files=("detectron2/engine/hooks.py",),
        pattern=r"torch\.optim\.lr_scheduler\._LRScheduler\b",
        replacement="torch.optim.lr_scheduler.LRScheduler",
    ),
    Fix(
        key="dense-head-gn-probe",
        reason="RetinaNetHead (also FCOS's head) probed the norm type with GroupNorm(32, 1), "
        "which torch now rejects; it probes with 32 channels, as upstream main does",
        files=("detectron2/modeling/meta_arch/retinanet.py",),
        pattern=r"norm_name = str\(type\(get_norm\(norm, 1\)\)\)",
        replacement="norm_name = str(type(get_norm(norm, 32)))",
    ),
    Fix(
        key="launch-cpu-gloo",
        reason="launch() asserted CUDA and used NCCL; without a GPU it now uses gloo "
        "(as upstream main does), so multi-process runs work on CPU",
        files=("detectron2/engine/launch.py",),
        pattern=r"    assert torch\.cuda\.is_available\(\), \"cuda is not available\. Please check "
        r"your installation\.\"\n((?:.|\n)*?)backend=\"NCCL\",((?:.|\n)*?)"
        r"    assert num_gpus_per_machine <= torch\.cuda\.device_count\(\)\n"
        r"    torch\.cuda\.set_device\(local_rank\)\n",
        replacement=r"    has_gpu = torch.cuda.is_available()\n\1"
        r'backend="NCCL" if has_gpu else "GLOO",\2'
        r"    if has_gpu:\n"
        r"        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        r"        torch.cuda.set_device(local_rank)\n",
    ),
    Fix(
        key="export-optional-caffe2",
        reason="detectron2.export imported its Caffe2 export API first, which needs caffe2 "
        "(gone from torch 2); it is now optional, as upstream main makes it, so TracingAdapter "
        "and the TorchScript helpers import",
        files=("detectron2/export/__init__.py",),
        pattern=r"^from \.api import \*\n",
        replacement="try:\n    from .api import *\nexcept ImportError:  # caffe2 (torch 1 only)\n"
        "    pass\n",
    ),
    Fix(
        key="ddp-cpu-device-ids",
        reason="create_ddp_model passed device_ids, which DistributedDataParallel rejects for "
        "CPU modules; they are now passed only when the model is on a GPU",
        files=("detectron2/engine/defaults.py",),
        pattern=r"    if \"device_ids\" not in kwargs:\n",
        replacement='    if "device_ids" not in kwargs and next(model.parameters()).is_cuda:\n',
    ),
)

# Packaging changes: install under the name `detectron2`, without the C++ extension, and
# without the sdist's pinned requirements (this project's requirements.txt provides them).
PACKAGING: tuple[Fix, ...] = (
    Fix(
        "dist-name",
        "install as `detectron2`",
        ("setup.py",),
        r'name="pb1-detectron2"',
        'name="detectron2"',
    ),
    Fix(
        "no-extension",
        "the sdist has no C++ sources",
        ("setup.py",),
        r"    ext_modules=get_extensions\(\),\n    cmdclass=\{[^}]*\},\n",
        "",
    ),
    Fix(
        "no-pinned-requirements",
        "requirements come from requirements.txt",
        ("setup.py",),
        r"install_requires=\[(?:.|\n)*?\n    \],",
        "install_requires=[],",
    ),
    Fix(
        "zoo-configs",
        "the sdist keeps the model-zoo configs inside the package",
        ("setup.py",),
        r"package_data=\{\"detectron2\.model_zoo\": get_model_zoo_configs\(\)\}",
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}',
    ),
)


class InstallError(RuntimeError):
    """The sdist could not be fetched, fixed or installed."""


def apply_fix(root: Path, fix: Fix) -> None:
    """Apply one fix under ``root``; raise :class:`InstallError` if a file lacks its pattern."""
    for rel in fix.files:
        path = root / rel
        if not path.is_file():
            raise InstallError(f"fix '{fix.key}': file {rel} is missing from the sdist")
        text = path.read_text()
        new_text, count = re.subn(fix.pattern, fix.replacement, text, flags=re.MULTILINE)
        if count == 0:
            raise InstallError(f"fix '{fix.key}': pattern not found in {rel}")
        path.write_text(new_text)


def fixes_digest() -> str:
    """Identifies this script's fixes; a copy installed with other fixes is reinstalled."""
    return hashlib.sha256(repr((SDIST_SHA256, FIXES, PACKAGING)).encode()).hexdigest()[:16]


def write_marker(root: Path) -> None:
    """Record the applied fixes inside the package, for diagnostics and tests."""
    lines = [
        '"""Written by direct_pretrain\'s tools/install_detectron2.py: this detectron2 is the',
        f'registry sdist {SDIST} with the compatibility fixes below, without C++ ops."""',
        "",
        f"SDIST = {SDIST!r}",
        f"SDIST_SHA256 = {SDIST_SHA256!r}",
        f"FIXES_DIGEST = {fixes_digest()!r}",
        "FIXES = {",
        *(f"    {fix.key!r}: {fix.reason!r}," for fix in FIXES),
        "}",
        "",
    ]
    (root / "detectron2" / f"{MARKER_MODULE}.py").write_text("\n".join(lines))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    """Run pip of the current interpreter; raise :class:`InstallError` on failure."""
    cmd = [sys.executable, "-m", "pip", *args]
    if subprocess.call(cmd) != 0:
        raise InstallError(f"command failed: {' '.join(cmd)}")


def fetch_sdist(work_dir: Path) -> Path:
    """Download the sdist with pip (its metadata step needs torch, hence no build isolation)."""
    pip(
        "download",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        ":all:",
        "--dest",
        str(work_dir),
        SDIST,
    )
    archive = work_dir / SDIST_FILE
    if not archive.is_file():
        raise InstallError(f"pip did not produce {archive}")
    digest = sha256(archive)
    if digest != SDIST_SHA256:
        raise InstallError(f"{archive}: sha256 {digest} != expected {SDIST_SHA256}")
    return archive


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / archive.name.removesuffix(".tar.gz")


def prepare_source(archive: Path, dest: Path) -> Path:
    """Unpack the sdist under ``dest`` and apply every fix; return the source root."""
    root = unpack(archive, dest)
    for fix in FIXES + PACKAGING:
        apply_fix(root, fix)
    write_marker(root)
    return root


def installed_detectron2() -> tuple[str | None, str | None]:
    """(location of an importable detectron2, digest of its fixes if this script made it)."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.origin is None:
        return None, None
    marker = Path(spec.origin).parent / f"{MARKER_MODULE}.py"
    if not marker.is_file():
        return spec.origin, None
    found = re.search(r"^FIXES_DIGEST = '(\w+)'", marker.read_text(), re.MULTILINE)
    return spec.origin, found.group(1) if found else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force",
        action="store_true",
        help="reinstall the fixed registry copy even if detectron2 is importable",
    )
    parser.add_argument("--sdist", type=Path, help="use this local sdist instead of downloading")
    args = parser.parse_args(argv)

    location, digest = installed_detectron2()
    if location and not args.force:
        if digest is None:
            print(f"detectron2 already importable ({location}); leaving it untouched.")
            return 0
        if digest == fixes_digest():
            print(f"detectron2 with the current fixes already installed ({location}).")
            return 0
        print("detectron2 was installed with other fixes; reinstalling.")
    with tempfile.TemporaryDirectory(prefix="d2-install-") as tmp:
        tmp_dir = Path(tmp)
        archive = args.sdist or fetch_sdist(tmp_dir)
        root = prepare_source(archive, tmp_dir)
        pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(root))
    print(
        f"installed detectron2 from {SDIST} with {len(FIXES)} compatibility fixes "
        "(no C++ ops: rotated boxes, deformable conv and the fast COCO evaluator are "
        "unavailable)."
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InstallError as e:
        sys.exit(f"install_detectron2: {e}")
