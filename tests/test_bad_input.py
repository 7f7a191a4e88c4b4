"""Bad input gets an error that names the culprit."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from detectron2.engine import HookBase

from direct_pretrain.checkpoint import SafeCheckpointer
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.data.mapper import BadImageError
from direct_pretrain.data.validate import DatasetError, checked_coco_json
from direct_pretrain.phases import phase_config
from direct_pretrain.pipeline import run_pipeline
from direct_pretrain.trainer import DirectPretrainTrainer
from direct_pretrain.utils.env import has_cpp_ops
from direct_pretrain.utils.io import ensure_writable_dir

from conftest import tiny_cfg


def test_missing_annotation_file_is_named(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO = [
        ["tiny_train", str(tmp_path / "nope.json"), synthetic_data["train"][1]]
    ]
    with pytest.raises(FileNotFoundError, match=r"REGISTER_COCO\[0\].*nope\.json"):
        register_datasets(cfg)


def test_missing_image_folder_is_named(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO = [
        ["tiny_train", synthetic_data["train"][0], str(tmp_path / "no_images")]
    ]
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_datasets(cfg)


def test_unregistered_dataset_is_named(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DATASETS.TRAIN = ("my_data_train",)
    with pytest.raises(KeyError, match="my_data_train"):
        register_datasets(cfg)


def _corrupt_copy(synthetic_data, tmp_path):
    """The synthetic training set with its first image truncated."""
    json_file, images = synthetic_data["train"]
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    victim = sorted(copy.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:50])
    return json_file, str(copy), victim.name


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_unreadable_image(synthetic_data, tmp_path, policy):
    json_file, images, victim = _corrupt_copy(synthetic_data, tmp_path)
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO[0] = ["tiny_train", json_file, images]
    cfg.DIRECT_PRETRAIN.BAD_IMAGES = policy
    cfg.DIRECT_PRETRAIN.FINETUNE.RANDOM_FLIP = False
    register_datasets(cfg)
    pcfg = phase_config(cfg, "FINETUNE", 8)
    cfg_loader = pcfg.clone()
    cfg_loader.defrost()
    cfg_loader.SOLVER.IMS_PER_BATCH = 8  # every image in one batch: the corrupt one is drawn
    loader = iter(DirectPretrainTrainer.build_train_loader(cfg_loader))
    if policy == "stop":
        with pytest.raises(BadImageError, match=victim):
            next(loader)
    else:
        batch = next(loader)
        assert len(batch) == 8
        assert all(victim not in item["file_name"] for item in batch)


def _coco(tmp_path, annotations, images=None, categories=None):
    data = {
        "images": (
            images
            if images is not None
            else [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}]
        ),
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "x"}],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return str(path)


def _ann(i, bbox, category=1, image=1):
    return {
        "id": i,
        "image_id": image,
        "category_id": category,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": 0,
    }


@pytest.mark.parametrize(
    "annotations, images, message",
    [
        ([], None, "no annotations"),
        ([_ann(1, [0, 0, 5, 5])], [], "no images"),
        (
            [_ann(7, [0, 0, 5, 5], category=3), _ann(8, [0, 0, 5, 5], category=4)],
            None,
            r"category_id not in categories: ids 7, 8 \(declared categories: 1\)",
        ),
        ([_ann(5, [0, 0, 5, 5], image=9)], None, "unknown image_id: ids 5"),
        ([_ann(6, [0, 0, 5])], None, "bbox is not 4 finite numbers: ids 6"),
        ([_ann(1, [0, 0, 5, 5])], [{"id": 1, "file_name": "a.png"}], "without width/height"),
    ],
)
def test_invalid_coco_is_refused_naming_ids(tmp_path, annotations, images, message):
    with pytest.raises(DatasetError, match=message):
        checked_coco_json("mine", _coco(tmp_path, annotations, images), tmp_path / "cache")


def test_boxes_outside_or_empty_are_repaired_with_counts(tmp_path, caplog):
    source = _coco(
        tmp_path,
        [
            _ann(1, [10, 10, 5, 5]),  # fine
            _ann(2, [45, 30, 20, 20]),  # reaches outside: clipped to 5 x 10
            _ann(3, [-5, 0, 10, 10]),  # reaches outside: clipped to 5 x 10
            _ann(4, [10, 10, 0, 5]),  # zero width: dropped
            _ann(5, [60, 10, 5, 5]),  # entirely outside: dropped
        ],
    )
    used = checked_coco_json("mine", source, tmp_path / "cache")
    assert used != source and "2 boxes clipped" in caplog.text and "2 boxes" in caplog.text
    boxes = {a["id"]: a["bbox"] for a in json.loads(open(used).read())["annotations"]}
    assert boxes == {1: [10, 10, 5, 5], 2: [45, 30, 5, 10], 3: [0, 0, 5, 10]}
    assert checked_coco_json("mine", source, tmp_path / "cache") == used  # cached verdict
    clean = _coco(tmp_path, [_ann(1, [10, 10, 5, 5])])
    assert checked_coco_json("mine", clean, tmp_path / "cache") == clean


def test_unwritable_output_dir_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(PermissionError, match="OUTPUT_DIR .*locked/out.* is not writable"):
            ensure_writable_dir(locked / "out")
    finally:
        locked.chmod(0o700)


def test_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(PermissionError, match="OUTPUT_DIR .*taken.* is not writable"):
        ensure_writable_dir(tmp_path / "taken")


@pytest.mark.skipif(has_cpp_ops(), reason="detectron2 here has its C++ ops")
def test_feature_needing_cpp_ops_is_refused(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignRotated"
    with pytest.raises(RuntimeError, match="POOLER_TYPE: rotated RoIAlign needs detectron2's C"):
        run_pipeline(cfg)


class _PoisonAfter(HookBase):
    """Makes every weight NaN after iteration ``n`` (a diverged optimizer step)."""

    def __init__(self, n):
        self.n = n

    def after_step(self):
        if self.trainer.iter == self.n:
            with torch.no_grad():
                for p in self.trainer.model.parameters():
                    p.fill_(float("nan"))


def test_non_finite_loss_names_phase_iteration_and_checkpoint(
    synthetic_data, tmp_path, monkeypatch
):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.PRETRAIN.MAX_ITER = 6
    build_hooks = DirectPretrainTrainer.build_hooks
    monkeypatch.setattr(
        DirectPretrainTrainer, "build_hooks", lambda self: [_PoisonAfter(2), *build_hooks(self)]
    )
    with pytest.raises(
        FloatingPointError,
        match=r"phase PRETRAIN: training diverged at "
        r"iteration 2 .*not saving checkpoint 'model_0000002'.*model_0000001\.pth",
    ):
        run_pipeline(cfg)
    last = (tmp_path / "pretrain" / "last_checkpoint").read_text()
    state = torch.load(tmp_path / "pretrain" / last, weights_only=True)["model"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _PoisonAfter(1)}, tmp_path / "x.pth")
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="x.pth' holds objects other than tensors"):
        SafeCheckpointer(model).load(str(tmp_path / "x.pth"))
