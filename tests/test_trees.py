"""The embedded tree-crown dataset: tiling, cut-crown rule, disjoint split, caching."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from detectron2.data.datasets import load_coco_json
from PIL import Image

from direct_pretrain.data.trees import (
    MIN_VISIBLE,
    SOURCES,
    TreeTile,
    build_neon_trees,
    deepforest_data_dir,
    make_tiles,
    split_tiles,
    tile_annotations,
    tile_origins,
)


def test_tile_origins_cover_without_padding():
    assert tile_origins(256, 256) == [0]
    assert tile_origins(400, 256) == [0, 144]
    assert tile_origins(1035, 256) == [0, 256, 512, 768, 779]
    with pytest.raises(ValueError, match="smaller than the tile size"):
        tile_origins(100, 256)


def test_sources_smaller_than_the_tile_get_tiles_of_their_shorter_side():
    sizes = dict(zip(SOURCES, [(400, 400), (400, 300), (1249, 1035), (2299, 2472)]))
    tiles = make_tiles(sizes, 1024)
    by_source = {s: [t for t in tiles if t.source == s] for s in SOURCES}
    assert [t.rect for t in by_source[SOURCES[0]]] == [(0, 0, 400, 400)]
    assert [t.rect for t in by_source[SOURCES[1]]] == [(0, 0, 300, 300), (100, 0, 400, 300)]
    assert {t.size for t in by_source[SOURCES[2]] + by_source[SOURCES[3]]} == {1024}


def test_cut_crowns_are_clipped_or_ignored():
    tile = TreeTile("s", 100, 100, 100)
    boxes = np.array(
        [
            [120, 120, 140, 140],  # inside
            [90, 120, 110, 140],  # half inside: kept, clipped
            [80, 120, 105, 140],  # 20% inside: ignored region
            [0, 0, 50, 50],  # outside
        ],
        dtype=float,
    )
    anns = tile_annotations(boxes, tile)
    assert [a["bbox"] for a in anns] == [[20, 20, 20, 20], [0, 20, 10, 20], [0, 20, 5, 20]]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1]
    assert MIN_VISIBLE == 0.5


def test_split_never_shares_pixels():
    sizes = {
        s: size for s, size in zip(SOURCES, [(400, 400), (400, 400), (1249, 1035), (2299, 2472)])
    }
    tiles = make_tiles(sizes, 256)
    train, val = split_tiles(tiles, 4)
    assert len(train) + len(val) == len(tiles) and val
    for v in val:
        for t in train:
            x0, y0, x1, y1 = v.rect
            a0, b0, a1, b1 = t.rect
            assert t.source != v.source or not (x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1)
    assert split_tiles(tiles, 4) == (train, val)  # deterministic


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory):
    """Source images in deepforest's layout, small enough to build in milliseconds."""
    folder = tmp_path_factory.mktemp("deepforest_data")
    rng = np.random.default_rng(0)
    for i, stem in enumerate(SOURCES):
        size = 80 + 30 * i
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{stem}.png"
        )
        objects = "".join(
            f"<object><name>Tree</name><bndbox><xmin>{x}</xmin><ymin>{x}</ymin>"
            f"<xmax>{x + 12}</xmax><ymax>{x + 15}</ymax></bndbox></object>"
            for x in range(2, size - 20, 9)
        )
        (folder / f"{stem}.xml").write_text(f"<annotation>{objects}</annotation>")
    return folder


def test_build_writes_loadable_coco_and_caches(fake_sources, tmp_path):
    built = build_neon_trees(tmp_path, tile=40, val_every=3, data_dir=fake_sources)
    dicts = {s: load_coco_json(j, root, s) for s, (j, root) in built.items()}
    assert dicts["train"] and dicts["val"]
    for d in dicts["train"] + dicts["val"]:
        assert (d["height"], d["width"]) == (40, 40)
        assert Image.open(d["file_name"]).size == (40, 40)
    stamp = (tmp_path / "neon_trees").stat().st_mtime_ns
    assert build_neon_trees(tmp_path, tile=40, val_every=3, data_dir=fake_sources) == built
    assert (tmp_path / "neon_trees").stat().st_mtime_ns == stamp  # nothing rebuilt
    other = build_neon_trees(tmp_path, tile=48, val_every=3, data_dir=fake_sources)
    assert other["train"][0] != built["train"][0]  # new tiling, new cache entry


def test_interrupted_build_is_not_used(fake_sources, tmp_path):
    built = build_neon_trees(tmp_path, tile=40, val_every=3, data_dir=fake_sources)
    folder = (tmp_path / built["train"][0]).parent
    (folder / "COMPLETE").unlink()  # as if the build had stopped before finishing
    shutil.rmtree(folder / "images")
    build_neon_trees(tmp_path, tile=40, val_every=3, data_dir=fake_sources)
    assert (folder / "COMPLETE").is_file() and any((folder / "images").iterdir())


def test_missing_source_file_is_named(fake_sources, tmp_path):
    broken = tmp_path / "src"
    shutil.copytree(fake_sources, broken)
    (broken / f"{SOURCES[2]}.xml").unlink()
    with pytest.raises(FileNotFoundError, match=f"{SOURCES[2]}.xml"):
        build_neon_trees(tmp_path / "cache", data_dir=broken)


def test_real_embedded_dataset(tmp_path):
    built = build_neon_trees(tmp_path)
    train = json.loads(open(built["train"][0]).read())
    val = json.loads(open(built["val"][0]).read())
    assert len(train["images"]) == 107 and len(val["images"]) == 16
    assert train["categories"] == [{"id": 1, "name": "tree"}]
    names = {i["file_name"] for i in train["images"]}
    assert not names & {i["file_name"] for i in val["images"]}
    assert deepforest_data_dir().is_dir()
