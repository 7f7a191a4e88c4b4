"""Pascal VOC and YOLO label folders register beside COCO json, checked and named like it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from direct_pretrain import get_cfg
from direct_pretrain.data.datasets import register_named_datasets
from direct_pretrain.data.validate import DatasetError
from direct_pretrain.pipeline import run_pipeline

from conftest import tiny_cfg

CLASSES = ["box", "blob"]


def _two_class_coco(json_file: str, out: Path) -> dict:
    """The synthetic COCO set with every other box in a second class and the first image
    without boxes, written to ``out``."""
    data = json.loads(Path(json_file).read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    for ann in data["annotations"]:
        ann["category_id"] = 1 + ann["id"] % 2
    data["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    out.write_text(json.dumps(data))
    return data


def _node(tmp_path: Path):
    """A default DIRECT_PRETRAIN node caching under ``tmp_path``."""
    node = get_cfg().DIRECT_PRETRAIN
    node.CACHE_DIR = str(tmp_path / "cache")
    return node


def _by_image(data: dict) -> list[tuple[dict, list[dict]]]:
    return [
        (img, [a for a in data["annotations"] if a["image_id"] == img["id"]])
        for img in data["images"]
    ]


def _voc_twin(data: dict, folder: Path) -> Path:
    """One Pascal VOC .xml per image of the COCO ``data`` (1-based corners); the first
    without <size>, which then comes from the image."""
    folder.mkdir(parents=True)
    for i, (img, anns) in enumerate(_by_image(data)):
        width, height = f"<width>{img['width']}</width>", f"<height>{img['height']}</height>"
        size = "" if i == 0 else f"<size>{width}{height}<depth>3</depth></size>"
        objects = "".join(
            f"<object><name>{CLASSES[a['category_id'] - 1]}</name><difficult>0</difficult>"
            f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax>"
            f"<ymax>{y + h}</ymax></bndbox></object>\n"
            for a in anns
            for x, y, w, h in [a["bbox"]]
        )
        text = f"<annotation>\n<filename>{img['file_name']}</filename>{size}\n{objects}"
        (folder / img["file_name"]).with_suffix(".xml").write_text(text + "</annotation>\n")
    return folder


def _yolo_twin(data: dict, folder: Path) -> Path:
    """One YOLO .txt per image with boxes of the COCO ``data``, and classes.txt beside them."""
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for img, anns in _by_image(data):
        if not anns:
            continue
        lines = []
        for a in anns:
            x, y, w, h = a["bbox"]
            cx, cy = (x + w / 2) / img["width"], (y + h / 2) / img["height"]
            lines.append(
                f"{a['category_id'] - 1} {cx!r} {cy!r} {w / img['width']!r} {h / img['height']!r}"
            )
        (folder / img["file_name"]).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return folder


def _summary(name: str) -> list[tuple]:
    dicts = sorted(DatasetCatalog.get(name), key=lambda d: d["file_name"])
    return [
        (
            d["file_name"],
            d["width"],
            d["height"],
            [(a["category_id"], a["bbox"], a.get("iscrowd", 0)) for a in d["annotations"]],
        )
        for d in dicts
    ]


def _assert_twins(name: str, twin: str) -> None:
    ours, theirs = _summary(name), _summary(twin)
    assert [item[:3] for item in ours] == [item[:3] for item in theirs]
    for (*_, anns), (*_, twin_anns) in zip(ours, theirs):
        assert [(c, crowd) for c, _, crowd in anns] == [(c, crowd) for c, _, crowd in twin_anns]
        for (_, box, _), (_, twin_box, _) in zip(anns, twin_anns):
            assert box == pytest.approx(twin_box, abs=1e-3)
    assert MetadataCatalog.get(name).thing_classes == MetadataCatalog.get(twin).thing_classes


def test_voc_and_yolo_twins_register_the_coco_dicts(synthetic_data, tmp_path):
    json_file, images = synthetic_data["train"]
    data = _two_class_coco(json_file, tmp_path / "coco.json")
    voc = _voc_twin(data, tmp_path / "Annotations")
    yolo = _yolo_twin(data, tmp_path / "labels")
    node = _node(tmp_path)
    node.REGISTER_COCO = [["coco_twin", str(tmp_path / "coco.json"), images]]
    node.REGISTER_VOC = [["voc_twin", str(voc), images, CLASSES]]
    node.REGISTER_YOLO = [["yolo_twin", str(yolo), images, str(yolo / "classes.txt")]]
    register_named_datasets(node, ["coco_twin", "voc_twin", "yolo_twin"])
    _assert_twins("voc_twin", "coco_twin")
    _assert_twins("yolo_twin", "coco_twin")
    assert MetadataCatalog.get("voc_twin").thing_classes == CLASSES

    converted = MetadataCatalog.get("yolo_twin").json_file
    register_named_datasets(node, ["yolo_twin"])
    assert MetadataCatalog.get("yolo_twin").json_file == converted  # cached
    label = sorted(yolo.glob("img*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.25 0.25\n")
    register_named_datasets(node, ["yolo_twin"])
    assert MetadataCatalog.get("yolo_twin").json_file != converted  # labels changed


def test_voc_difficult_objects_are_crowd_boxes(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "a.xml").write_text(
        "<annotation><object><name>box</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>"
        "<ymax>20</ymax></bndbox></object><object><name>box</name><difficult>1</difficult>"
        "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>8</xmax><ymax>8</ymax></bndbox></object>"
        "</annotation>"
    )
    node = _node(tmp_path)
    node.REGISTER_VOC = [["hard", str(tmp_path), str(tmp_path), ["box"]]]
    register_named_datasets(node, ["hard"])
    ((_, width, height, anns),) = _summary("hard")
    assert (width, height) == (40, 30)  # no <size>: from the image
    assert anns == [(0, [0.0, 0.0, 10.0, 20.0], 0), (0, [4.0, 4.0, 4.0, 4.0], 1)]


def _register_one(tmp_path, key: str, labels: Path, classes) -> None:
    node = _node(tmp_path)
    node[key] = [["mine", str(labels), str(tmp_path / "images"), classes]]
    register_named_datasets(node, ["mine"])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "<annotation>\n<object>\n<name>box</name>\n</annotation>\n",
            "line 4: not well-formed XML",
        ),
        (
            "<annotation>\n<object><name>box</name></object>\n</annotation>",
            "line 2: <object> without <bndbox>",
        ),
        (
            "<annotation>\n<object>\n<name>cat</name><bndbox/></object></annotation>",
            r"line 3: class 'cat' is not in the class list \(box\)",
        ),
        (
            "<annotation><object><name>box</name>\n<bndbox><xmin>1</xmin></bndbox>\n</object>"
            "</annotation>",
            "line 2: <bndbox> needs the numbers <xmin>, <ymin>, <xmax>, <ymax>",
        ),
        ("<svg/>", r"line 1: root <svg>, not <annotation>"),
    ],
    ids=["malformed", "no_bndbox", "unknown_class", "bad_bndbox", "other_root"],
)
def test_bad_voc_file_is_named_with_its_line(tmp_path, text, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.xml").write_text(text)
    with pytest.raises(DatasetError, match=rf"dataset 'mine': '.*ann/a\.xml' {message}"):
        _register_one(tmp_path, "REGISTER_VOC", tmp_path / "ann", ["box"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 0.5 0.5 0.2\n", r"line 1: expected 5 numbers 'class cx cy w h', got '0 0.5 0.5 0.2'"),
        ("0 0.5 0.5 0.2 x\n", "line 1: expected 5 numbers"),
        (
            "0 0.5 0.5 0.2 0.2\n\n2 0.5 0.5 0.1 0.1\n",
            r"line 3: class 2 is not an index of the 2 classes \(0-1: box, blob\)",
        ),
        ("0.5 0.5 0.5 0.1 0.1\n", "line 1: class 0.5 is not an index"),
        ("1 1.5 0.5 0.2 0.2\n", "line 1: coordinates outside 0-1 in '1 1.5 0.5 0.2 0.2'"),
    ],
    ids=["four_numbers", "not_a_number", "class_out_of_range", "class_not_integer", "outside"],
)
def test_bad_yolo_line_is_named_with_file_and_line(tmp_path, text, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(text)
    (tmp_path / "data.yaml").write_text("names:\n  0: box\n  1: blob\n")
    with pytest.raises(DatasetError, match=rf"dataset 'mine': '.*labels/a\.txt' {message}"):
        _register_one(tmp_path, "REGISTER_YOLO", tmp_path / "labels", str(tmp_path / "data.yaml"))


def test_label_file_without_an_image_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"1 label file\(s\) without an image .*labels/b\.txt'"):
        _register_one(tmp_path, "REGISTER_YOLO", tmp_path / "labels", ["box"])


@pytest.fixture
def three_formats(synthetic_data, tmp_path) -> dict[str, Path]:
    """The synthetic training set as a COCO json, a VOC folder and a YOLO folder."""
    json_file, images = synthetic_data["train"]
    data = _two_class_coco(json_file, tmp_path / "coco.json")
    return {
        "images": Path(images),
        "COCO": tmp_path / "coco.json",
        "VOC": _voc_twin(data, tmp_path / "Annotations"),
        "YOLO": _yolo_twin(data, tmp_path / "labels"),
    }


@pytest.mark.parametrize(
    "given, key, message",
    [
        (
            "COCO",
            "REGISTER_VOC",
            r"coco\.json' is a COCO json file, not a folder of Pascal VOC \.xml files; COCO "
            r"annotations are registered with DIRECT_PRETRAIN\.REGISTER_COCO",
        ),
        (
            "COCO",
            "REGISTER_YOLO",
            r"coco\.json' is a COCO json file, not a folder of YOLO \.txt files; COCO",
        ),
        (
            "VOC",
            "REGISTER_YOLO",
            r"Annotations' is a folder of Pascal VOC annotations \(8 \.xml files\), not a folder "
            r"of YOLO \.txt files; Pascal VOC annotations are registered with "
            r"DIRECT_PRETRAIN\.REGISTER_VOC \[\[name, annotations_dir, image_root, classes\], ",
        ),
        (
            "YOLO",
            "REGISTER_VOC",
            r"labels' is a folder of YOLO labels \(\d+ \.txt files\), not a folder of Pascal VOC "
            r"\.xml files; YOLO annotations are registered with DIRECT_PRETRAIN\.REGISTER_YOLO",
        ),
        (
            "VOC",
            "REGISTER_COCO",
            r"Annotations' is a folder of Pascal VOC annotations \(8 \.xml files\): Pascal VOC "
            r"annotations are registered with DIRECT_PRETRAIN\.REGISTER_VOC .*; expected a COCO",
        ),
        (
            "YOLO",
            "REGISTER_COCO",
            r"labels' is a folder of YOLO labels .*: YOLO annotations are registered with "
            r"DIRECT_PRETRAIN\.REGISTER_YOLO .*; expected a COCO",
        ),
    ],
    ids=[
        "coco_as_voc",
        "coco_as_yolo",
        "voc_as_yolo",
        "yolo_as_voc",
        "voc_as_coco",
        "yolo_as_coco",
    ],
)
def test_labels_of_another_format_are_named(three_formats, tmp_path, given, key, message):
    node = _node(tmp_path)
    entry = ["mine", str(three_formats[given]), str(three_formats["images"])]
    node[key] = [entry if key == "REGISTER_COCO" else [*entry, CLASSES]]
    with pytest.raises(DatasetError, match=rf"dataset 'mine': '.*{message}"):
        register_named_datasets(node, ["mine"])


def test_yolo_dataset_trains_every_phase(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path / "run")
    node = cfg.DIRECT_PRETRAIN
    node.REGISTER_COCO = []
    for split in ("train", "val"):
        json_file, images = synthetic_data[split]
        labels = _yolo_twin(json.loads(Path(json_file).read_text()), tmp_path / split)
        node.REGISTER_YOLO.append(
            [f"tiny_{split}", str(labels), images, str(labels / "classes.txt")]
        )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    summary = run_pipeline(cfg)
    for phase in ("PRETRAIN", "FINETUNE"):
        assert summary["phases"][phase]["iterations"] == 2
        assert "AP" in summary["phases"][phase]
