"""Confusion-matrix counts on hand-made detections."""

from __future__ import annotations

from direct_pretrain.confusion import confusion_matrix, plot_confusion


def _gt() -> dict:
    boxes = [  # image 1: a cat and a dog; image 2: a dog, and a crowd of cats
        (1, 1, [0, 0, 10, 10], 0),
        (2, 1, [20, 20, 10, 10], 1),
        (3, 2, [0, 0, 10, 10], 1),
        (4, 2, [50, 50, 20, 20], 0, 1),
    ]
    return {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {
                "id": a[0],
                "image_id": a[1],
                "bbox": a[2],
                "category_id": (7, 9)[a[3]],
                "iscrowd": a[4] if len(a) > 4 else 0,
            }
            for a in boxes
        ],
    }


def test_counts_matches_confusions_misses_and_false_detections(tmp_path):
    results = [
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},  # cat as cat
        {"image_id": 1, "category_id": 9, "bbox": [1, 0, 10, 10], "score": 0.8},  # 2nd on cat
        {"image_id": 1, "category_id": 7, "bbox": [90, 90, 5, 5], "score": 0.7},  # nothing
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 11], "score": 0.6},  # dog as cat
        {"image_id": 2, "category_id": 7, "bbox": [50, 50, 20, 20], "score": 0.95},  # crowd
        {"image_id": 1, "category_id": 9, "bbox": [20, 20, 10, 10], "score": 0.2},  # too low
    ]
    confusion = confusion_matrix(_gt(), results, threshold=0.5)
    assert confusion["classes"] == ["cat", "dog", "background"]
    # rows: true cat, true dog, background; columns: predicted cat, dog, background (missed)
    assert confusion["matrix"] == [
        [1, 0, 0],  # the cat found as a cat
        [1, 0, 1],  # one dog taken for a cat, one dog missed (its detection scored 0.2)
        [1, 1, 0],  # false detections: the box on nothing (cat), the second box on the cat (dog)
    ]
    low = confusion_matrix(_gt(), results, threshold=0.1)
    assert low["matrix"][1] == [1, 1, 0]  # the 0.2 detection now finds the second dog
    plot_confusion(confusion, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 1000
