"""Bad input gets an error that names the culprit."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from direct_pretrain.checkpoint import SafeCheckpointer
from direct_pretrain.config_systems import phase_config
from direct_pretrain.data.datasets import register_datasets
from direct_pretrain.data.images import BadImageError, ImageSizeError, read_image_checked
from direct_pretrain.data.mapper import CheckedDatasetMapper
from direct_pretrain.data.pixel_stats import dataset_pixel_stats
from direct_pretrain.data.resized_cache import resized_dicts
from direct_pretrain.data.validate import DatasetError, checked_coco_json
from direct_pretrain.engine import DirectPretrainTrainer, phase_training_dicts
from direct_pretrain.pipeline import prepare_config, run_pipeline
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


EXPECTED = (
    r"; expected a COCO detection json \(an object with 'images', 'annotations' and "
    r"'categories'\)"
)
REGISTERED = r"annotations are registered with DIRECT_PRETRAIN\.REGISTER_"
VOC = "<annotation><filename>a.png</filename><object><name>tree</name></object></annotation>"


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "list.json",
            json.dumps([{"image_id": 1}]),
            r"list\.json' holds a JSON list \(length 1\), not an object",
        ),
        ("number.json", "3", r"number\.json' holds a JSON number, not an object"),
        (
            "labelme.json",
            json.dumps({"shapes": [], "imagePath": "a.png"}),
            r"without 'annotations', 'categories', 'images' \(its keys: 'imagePath', 'shapes'\)",
        ),
        ("a.xml", VOC, rf"a\.xml' is a Pascal VOC annotation .*: Pascal VOC {REGISTERED}VOC"),
        (
            "b.xml",
            '<?xml version="1.0"?><svg xmlns="x"/>',
            r"b\.xml' is an XML document \(root <svg>",
        ),
        (
            "a.txt",
            "0 0.5 0.5 0.2 0.3\n\n1 0.1 0.2 0.05 0.05\n",
            rf"YOLO labels .*: YOLO {REGISTERED}YOLO \[\[name, labels_dir, image_root, ",
        ),
        ("notes.txt", "1 2 3\n", r"cannot read '.*notes\.txt' as JSON: Extra data"),
    ],
    ids=["list", "number", "other_object", "voc_xml", "other_xml", "yolo_txt", "not_json"],
)
def test_annotation_file_in_another_format_is_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=rf"dataset 'mine': .*{message}.*{EXPECTED}"):
        checked_coco_json("mine", str(tmp_path / name), tmp_path / "cache")


def test_folder_as_annotation_file_is_named(synthetic_data, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text("{}")
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO[0][1] = str(tmp_path / "annotations")
    folder = r"annotations' is a folder, not a file \(its \.json files: train\.json\)"
    with pytest.raises(DatasetError, match=rf"dataset 'tiny_train': '.*{folder}{EXPECTED}"):
        register_datasets(cfg)


@pytest.mark.parametrize("filter_empty", [True, False])
def test_training_images_without_boxes(synthetic_data, tmp_path, caplog, filter_empty):
    json_file, images = synthetic_data["train"]
    data = json.loads(open(json_file).read())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] > 3]
    (tmp_path / "some_empty.json").write_text(json.dumps(data))
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO[0] = ["tiny_train", str(tmp_path / "some_empty.json"), images]
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
    cfg, num_images = prepare_config(cfg)
    dicts = phase_training_dicts(phase_config(cfg, "FINETUNE", num_images))
    names = {os.path.basename(d["file_name"]) for d in dicts}
    empty = {"img000.png", "img001.png", "img002.png"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warnings = [w for w in warnings if "no usable annotations" in w]
    if filter_empty:
        assert num_images == len(dicts) == 5 and not names & empty
        (warning,) = warnings
        assert warning.startswith("Training set 'tiny_train': 3 of 8 images have no usable")
        assert "fewer false positives); DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps" in warning
    else:
        assert num_images == len(dicts) == 8 and empty <= names
        assert not warnings


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
        (
            [_ann(1, [0, 0, 5, 5])],
            [
                {"id": 1, "file_name": "a.png", "width": 50, "height": 40},
                {"id": 1, "file_name": "b.png", "width": 50, "height": 40},
            ],
            r"data\.json.*same id \(ids 1\)",
        ),
        (
            [_ann(1, [0, 0, 5, 5])],
            [
                {"id": 1, "file_name": "a.png", "width": 50, "height": 40},
                {"id": 2, "file_name": "a.png", "width": 50, "height": 40},
            ],
            r"data\.json.*same file_name \(file names a\.png\)",
        ),
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


def _record(path, width, height, image_id=1):
    return {
        "file_name": str(path),
        "image_id": image_id,
        "width": width,
        "height": height,
        "annotations": [],
    }


def _rgb(height=24, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _truncated_jpeg(path):
    Image.fromarray(_rgb(32, 32)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_16bit_png_is_scaled_not_white(tmp_path):
    values = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # stored with 16 bits
    expected = np.rint(values / 257).astype(np.uint8)  # 0..65535 -> 0..255
    assert 0 < expected.mean() < 200
    assert (read_image_checked(str(path), "BGR") == expected[..., None]).all()
    mapped = CheckedDatasetMapper(False, augmentations=[], image_format="BGR")(
        _record(path, 32, 24)
    )
    assert torch.equal(mapped["image"], torch.from_numpy(np.repeat(expected[None], 3, 0)))
    mean, std = dataset_pixel_stats([str(path)], "BGR", 10, tmp_path / "cache")
    assert mean == pytest.approx([expected.mean()] * 3, abs=1e-3)
    assert std == pytest.approx([expected.std()] * 3, abs=1e-3)


@pytest.mark.parametrize("name, mode", [("palette.png", "P"), ("cmyk.jpg", "CMYK")])
def test_palette_and_cmyk_images_convert_like_pillow(tmp_path, name, mode):
    path = tmp_path / name
    rgb = Image.fromarray(_rgb())
    (rgb.quantize(16) if mode == "P" else rgb.convert(mode)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
        expected = np.asarray(stored.convert("RGB"))
    assert (read_image_checked(str(path), "RGB") == expected).all()
    assert (read_image_checked(str(path), "BGR") == expected[:, :, ::-1]).all()


def test_image_mode_without_8bit_conversion_is_refused(tmp_path):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
    with pytest.raises(BadImageError, match=r"depth\.tif': mode F has no known conversion"):
        read_image_checked(str(path), "BGR")


def test_exif_rotated_image_with_the_stored_size_is_refused(tmp_path):
    path = tmp_path / "phone.jpg"
    image = Image.fromarray(_rgb(30, 40))  # stored 40 wide, 30 high
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: turn 90 degrees, so it shows 30 wide, 40 high
    image.save(path, exif=exif)
    box = {**_ann(1, [2, 20, 8, 8]), "bbox_mode": BoxMode.XYWH_ABS}
    record = {**_record(path, 40, 30), "annotations": [box]}
    sizes = r"phone\.jpg' is 30x40 \(width x height\) as decoded, but its dataset says 40x30"
    mapper = CheckedDatasetMapper(True, augmentations=[], image_format="BGR")
    with pytest.raises(ImageSizeError, match=sizes):
        mapper(record)
    with pytest.raises(ImageSizeError, match=sizes):
        CheckedDatasetMapper(False, augmentations=[], image_format="BGR")(record)
    with pytest.raises(BadImageError, match=sizes):  # never squashed into the cache
        resized_dicts([record], 16, 16, tmp_path / "cache", workers=1)
    upright = {**record, "width": 30, "height": 40}
    assert mapper(upright)["image"].shape == (3, 40, 30)


def test_truncated_jpeg_is_named(tmp_path):
    path = _truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(BadImageError, match=r"cannot read image '.*cut\.jpg'"):
        read_image_checked(str(path), "BGR")
    mapper = CheckedDatasetMapper(True, augmentations=[], image_format="BGR")
    with pytest.raises(BadImageError, match=r"cut\.jpg.*BAD_IMAGES skip"):
        mapper(_record(path, 32, 32))


def test_bad_images_in_statistics_and_cache(tmp_path, caplog):
    good = []
    for i in range(2):
        good.append(tmp_path / f"ok{i}.png")
        Image.fromarray(_rgb(32, 32, seed=i)).save(good[-1])
    bad = _truncated_jpeg(tmp_path / "cut.jpg")
    names = [str(p) for p in (*good, bad)]
    cache = tmp_path / "cache"

    with pytest.raises(BadImageError, match=r"pixel statistics: .*cut\.jpg.*BAD_IMAGES skip"):
        dataset_pixel_stats(names, "BGR", 10, cache)
    mean, _ = dataset_pixel_stats(names, "BGR", 10, cache, skip_bad=True)
    assert "skipping bad image" in caplog.text and "cut.jpg" in caplog.text
    pixels = np.concatenate([np.asarray(Image.open(p))[..., ::-1].reshape(-1, 3) for p in good])
    assert mean == pytest.approx(pixels.mean(0).round(3).tolist())
    with pytest.raises(BadImageError, match=r"cut\.jpg"):  # cached result, still named
        dataset_pixel_stats(names, "BGR", 10, cache)

    records = [_record(name, 32, 32, i) for i, name in enumerate(names)]
    with pytest.raises(BadImageError, match=r"1 bad training image.*cut\.jpg.*BAD_IMAGES skip"):
        resized_dicts(records, 16, 16, cache, workers=2)  # errors come back from the workers
    (complete,) = (cache / "resized").glob("*/COMPLETE.json")
    stamp = complete.stat().st_mtime_ns
    caplog.clear()
    kept = resized_dicts(records, 16, 16, cache, skip_bad=True, workers=2)
    assert complete.stat().st_mtime_ns == stamp  # the copies of the first attempt are reused
    assert "left out of the training set" in caplog.text and "cut.jpg" in caplog.text
    assert [Image.open(d["file_name"]).size for d in kept] == [(16, 16)] * 2
    assert all("cut" not in d["file_name"] for d in kept)


class _GroundTruthModel(torch.nn.Module):
    """A perfect detector: predicts each image's ground-truth boxes with score 1."""

    def __init__(self, records):
        super().__init__()
        self.boxes = {
            r["image_id"]: [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in r["annotations"]
            ]
            for r in records
        }

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            boxes = torch.tensor(self.boxes[x["image_id"]], dtype=torch.float32)
            instances = Instances((x["height"], x["width"]))
            instances.pred_boxes = Boxes(boxes)
            instances.scores = torch.ones(len(boxes))
            instances.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
            outputs.append({"instances": instances})
        return outputs


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_bad_test_image_in_evaluation(synthetic_data, tmp_path, caplog, policy):
    json_file, images = synthetic_data["val"]
    copy = tmp_path / "val"
    shutil.copytree(images, copy)
    victim = sorted(copy.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:50])
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.REGISTER_COCO[1] = ["tiny_val", json_file, str(copy)]
    cfg.DIRECT_PRETRAIN.BAD_IMAGES = policy
    register_datasets(cfg)
    pcfg = phase_config(cfg, "FINETUNE", 8)
    model = _GroundTruthModel(DatasetCatalog.get("tiny_val"))
    if policy == "stop":
        with pytest.raises(BadImageError, match=victim.name):
            DirectPretrainTrainer.test(pcfg, model)
        return
    results = DirectPretrainTrainer.test(pcfg, model)
    # the left-out image's boxes are not counted as missed
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert victim.name in caplog.text and "restricted to the 2 of 3 images" in caplog.text
