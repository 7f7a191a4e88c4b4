"""The detectron2 install step: the fixer itself, and each compatibility fix's behaviour.

The behaviour tests hold for any working detectron2 (an upstream build too); the fixer tests
run on a small fake source tree, so they need no download.
"""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT


def _load_installer():
    spec = importlib.util.spec_from_file_location(
        "install_detectron2", ROOT / "tools" / "install_detectron2.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


installer = _load_installer()

PATCHED = importlib.util.find_spec("detectron2._direct_pretrain_fixes") is not None


# --- the fixer ------------------------------------------------------------------------------


def test_fix_applies_and_a_missing_pattern_is_named(tmp_path):
    (tmp_path / "a.py").write_text("x = np.int(3)\ny = np.int64(2)\n")
    fix = next(f for f in installer.FIXES if f.key == "numpy-aliases")
    installer.apply_fix(
        tmp_path, installer.Fix(fix.key, "", ("a.py",), fix.pattern, fix.replacement)
    )
    assert (tmp_path / "a.py").read_text() == "x = int(3)\ny = np.int64(2)\n"
    with pytest.raises(installer.InstallError, match="'numpy-aliases': pattern not found in a.py"):
        installer.apply_fix(
            tmp_path, installer.Fix(fix.key, "", ("a.py",), fix.pattern, fix.replacement)
        )
    with pytest.raises(installer.InstallError, match="b.py is missing"):
        installer.apply_fix(tmp_path, installer.Fix("k", "", ("b.py",), "x", "y"))


def test_prepare_source_rejects_a_changed_sdist(tmp_path):
    root = tmp_path / "pb1-detectron2-0.6"
    (root / "detectron2").mkdir(parents=True)
    (root / "setup.py").write_text("setup()\n")
    archive = tmp_path / "pb1-detectron2-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    with pytest.raises(installer.InstallError, match="fix 'optional-cpp-ops'"):
        installer.prepare_source(archive, tmp_path / "unpacked")


def test_marker_digest_tracks_the_fixes():
    digest = installer.fixes_digest()
    assert len(digest) == 16 and digest == installer.fixes_digest()
    if PATCHED:
        from detectron2 import _direct_pretrain_fixes as marker

        assert marker.FIXES_DIGEST == digest
        assert set(marker.FIXES) == {f.key for f in installer.FIXES}


# --- each fix, by behaviour -----------------------------------------------------------------


def test_optional_cpp_ops_modules_import():
    import detectron2.evaluation.fast_eval_api  # noqa: F401
    import detectron2.layers.deform_conv  # noqa: F401
    import detectron2.layers.roi_align_rotated  # noqa: F401
    import detectron2.layers.rotated_boxes  # noqa: F401

    from direct_pretrain import get_cfg
    from direct_pretrain.utils.env import check_cpp_requirements, has_cpp_ops

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    if has_cpp_ops():
        check_cpp_requirements(cfg)
    else:
        with pytest.raises(RuntimeError, match="DEFORM_ON_PER_STAGE: deformable convolution"):
            check_cpp_requirements(cfg)


def test_pillow_bilinear_default():
    from detectron2.data.transforms import ExtentTransform

    image = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    assert ExtentTransform((0, 0, 10, 10), (5, 5)).apply_image(image).shape == (5, 5, 3)


def test_model_zoo_config_path():
    from detectron2 import model_zoo

    assert Path(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")).is_file()


def test_numpy_alias_code_paths():
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.structures.masks import PolygonMasks, polygons_to_bitmask

    print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["tree"])
    assert polygons_to_bitmask([], 4, 4).dtype == bool
    assert PolygonMasks([[np.array([0, 0, 2, 0, 2, 2.0])]]).nonempty().tolist() == [True]


def test_dense_head_with_group_norm():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    head = RetinaNetHead(
        input_shape=[ShapeSpec(channels=32)] * 2,
        num_classes=3,
        num_anchors=1,
        conv_dims=[32],
        norm="GN",
    )
    logits, deltas = head([torch.rand(1, 32, 8, 8), torch.rand(1, 32, 4, 4)])
    assert logits[0].shape == (1, 3, 8, 8) and deltas[1].shape == (1, 4, 4, 4)


def test_lr_scheduler_hook_saves_torch_schedulers():
    from detectron2.engine import hooks

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = hooks.LRScheduler(optimizer, scheduler).state_dict()
    assert state["last_epoch"] == 12
    fresh = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([param], lr=1.0), step_size=5)
    hooks.LRScheduler(optimizer, fresh).load_state_dict(state)
    assert fresh.last_epoch == 12


def _all_reduce_on_cpu(result_file: str) -> None:
    import torch.distributed as dist
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm

    value = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(value)
    ddp = create_ddp_model(torch.nn.Linear(2, 2))
    ddp(torch.zeros(1, 2)).sum().backward()
    if comm.is_main_process():
        Path(result_file).write_text(f"{value.item()} {type(ddp).__name__}")
    dist.destroy_process_group()  # gloo threads left running abort the process at exit


@pytest.mark.skipif(
    not PATCHED or torch.cuda.is_available(),
    reason="checks the CPU launch fixes of the registry copy",
)
def test_launch_and_ddp_on_cpu(tmp_path):
    from detectron2.engine import launch

    result = tmp_path / "result.txt"
    launch(_all_reduce_on_cpu, 2, dist_url="auto", args=(str(result),))
    assert result.read_text() == "3.0 DistributedDataParallel"


def test_export_package_imports():
    """``export-optional-caffe2``: Detectron2's tracing export imports without caffe2."""
    from detectron2.export import TracingAdapter, scripting_with_instances

    assert callable(TracingAdapter) and callable(scripting_with_instances)
