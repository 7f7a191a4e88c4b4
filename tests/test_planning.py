"""The planner: plans from synthetic datasets of different shapes, user values kept, the saved
plan reused or refused, re-planning on speed drift, ``--plan-only``."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from direct_pretrain.config import get_cfg
from direct_pretrain.config_systems import system_of
from direct_pretrain.engine import BudgetPace, PaceChanged, time_steps
from direct_pretrain.phases import schedule
from direct_pretrain.pipeline import PhaseStateError, prepare_config
from direct_pretrain.planning import (
    PLAN_FILE,
    PlanChangedError,
    apply_plan,
    make_plan,
    planned_config,
    replan_after,
)
from direct_pretrain.planning.plan import plan_inputs
from direct_pretrain.planning.rules import (
    CPU_BATCH,
    DataFigures,
    anchor_recall,
    cpu_batch,
    finetune_candidates,
    phase_schedule,
    pick_measured_scale,
)
from direct_pretrain.utils.io import plain

from conftest import ROOT, fake_calibration, shrink, tiny_cfg, write_config

DEMO = ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml"
PLANNED = ROOT / "configs" / "planned" / "faster_rcnn_R_18_FPN.yaml"


def _dataset(sizes, sides, per_image=10, seed=0) -> list[dict]:
    """Images of the given (height, width) sizes (cycled), each with ``per_image`` square-ish
    boxes whose side is drawn log-uniformly from ``sides`` (min, max)."""
    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(40):
        height, width = sizes[i % len(sizes)]
        anns = []
        for _ in range(per_image):
            side = float(np.exp(rng.uniform(*np.log(sides))))
            w, h = side * rng.uniform(0.8, 1.25), side
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            anns.append({"bbox": [x, y, w, h], "bbox_mode": 1, "category_id": 0, "iscrowd": 0})
        dicts.append({"height": height, "width": width, "annotations": anns})
    return dicts


def _planned_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(str(PLANNED))
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _plan(dicts, cfg=None, user=None, budget=10.0, calibrate=None):
    cfg = cfg or _planned_cfg()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = budget
    cfg.freeze()
    system = system_of(cfg)
    inputs = plan_inputs(system, cfg, {"data": "x"}, user or {}, len(dicts))
    plan = make_plan(
        system, cfg, dicts, user or {}, inputs, calibrate=calibrate or fake_calibration()
    )
    return plan, apply_plan(system, cfg, plan)


def _values(plan) -> dict:
    return {k.removeprefix("DIRECT_PRETRAIN."): v for k, v in plan["values"].items()}


def test_tiny_objects_in_large_images_train_on_crops_at_an_enlarged_scale():
    plan, cfg = _plan(_dataset([(2560, 2560)], (8, 20)))
    v = _values(plan)
    assert plan["scales"]["FINETUNE"] > 1  # 10th-percentile box under 16 px: enlarged
    assert v["FINETUNE.AUGMENTATION"] == "fixed_size_crop"
    assert v["FINETUNE.CROP_SIZE"] == [512, 512]  # the CPU crop limit
    assert v["FINETUNE.MIN_SIZE_TEST"] > 2560  # evaluated on whole images at that scale
    # Pre-training shrinks less than 1/3 so that the small boxes keep 10 px.
    assert 1 / 3 < plan["scales"]["PRETRAIN"] / plan["scales"]["FINETUNE"] < 1
    assert v["PRETRAIN.CROP_SIZE"] == [320, 320]
    phase = system_of(cfg).resolve(cfg, "FINETUNE")
    assert phase.AUGMENTATION == "fixed_size_crop" and phase.CROP_SIZE == (512, 512)


def test_large_objects_in_small_images_shrink_both_phases():
    plan, _ = _plan(_dataset([(480, 640)], (100, 250)))
    v = _values(plan)
    assert plan["scales"]["FINETUNE"] < 0.3  # the 10th-percentile box (~110 px) -> 24 px
    assert v["FINETUNE.AUGMENTATION"] == "shortest_edge"
    assert v["FINETUNE.MIN_SIZE_TRAIN"][0] < 480
    # the fine-tune scale puts the 10th-percentile box at 24 px; pre-training keeps it at 10
    assert plan["scales"]["PRETRAIN"] == pytest.approx(
        plan["scales"]["FINETUNE"] * 10 / 24, rel=0.01
    )
    anchors = v["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert all(a[0] >= 3 * s for a, s in zip(anchors, (4, 8, 16, 32, 64)))


def test_mixed_sizes_get_anchors_that_match_most_boxes_at_both_scales():
    dicts = _dataset([(800, 800)], (6, 300))
    plan, cfg = _plan(dicts)
    anchors = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    data = DataFigures.of(dicts)
    ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    for phase, scale in plan["scales"].items():
        chosen = anchor_recall(data.box_wh * scale, anchors, ratios)
        for k in (-1, 1):  # the chosen power of two is the best allowed one
            other = [[a[0] * 2.0**k] for a in anchors]
            if other[0][0] >= 12:
                assert chosen >= anchor_recall(data.box_wh * scale, other, ratios) - 0.05
        assert chosen > 0.8, phase


def test_one_image_size_or_many_plan_from_the_median_image():
    one = _values(_plan(_dataset([(600, 800)], (30, 60)))[0])
    many = _values(_plan(_dataset([(300, 400), (600, 800), (900, 1200)], (30, 60)))[0])
    for key in ("FINETUNE.MIN_SIZE_TEST", "FINETUNE.MAX_SIZE_TEST", "PRETRAIN.SCALE"):
        assert one[key] == many[key], key


def test_the_budget_is_split_and_turned_into_epochs():
    dicts = _dataset([(256, 256)], (15, 60))
    plan, cfg = _plan(dicts, budget=12.0)
    seconds = plan["budget_seconds"]
    assert sum(seconds.values()) == pytest.approx(720, abs=1)
    assert seconds["FINETUNE"] == pytest.approx(240, abs=1)  # a third (scale change ~2x)
    system = system_of(cfg)
    for phase in ("PRETRAIN", "FINETUNE"):
        iters, _ = system.resolve(cfg, phase).schedule(len(dicts))
        assert iters == pytest.approx(seconds[phase] / 0.5, rel=0.02)  # 0.5 s per iteration


@pytest.mark.parametrize("num_images", [37, 40, 1000, 118287])
@pytest.mark.parametrize("batch", [4, 8, 16])
def test_the_plan_states_the_iterations_the_trainer_runs(num_images, batch):
    for seconds in (7.0, 300.0, 1234.5, 36000.0):
        rows = {c.key: c for c in phase_schedule("FINETUNE", seconds, 0.37, batch, num_images)}
        node = SimpleNamespace(DATASET_REPEAT=1, IMS_PER_BATCH=batch)
        node.MAX_ITER, node.EPOCHS = rows["MAX_ITER"].value, rows["EPOCHS"].value
        node.STEP_EPOCHS = rows["STEP_EPOCHS"].value
        iters, steps = schedule(node, num_images)
        assert iters == max(10, int(seconds / 0.37))
        assert rows["EPOCHS"].figure.startswith(f"{iters} iterations of {batch} images")
        assert node.EPOCHS == pytest.approx(iters * batch / num_images, rel=0.005)
        assert len(steps) == 1 and abs(steps[0] - 0.75 * iters) <= max(1, 0.005 * iters)


def test_a_budget_too_small_for_the_epochs_trains_on_smaller_crops_timed_again():
    cfg = _planned_cfg().clone()
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.5
    cfg.freeze()
    dicts = _dataset([(512, 512)], (15, 60))
    system = system_of(cfg)
    inputs = plan_inputs(system, cfg, {"data": "x"}, {}, len(dicts))
    calibrate = fake_calibration()
    plan = make_plan(system, cfg, dicts, {}, inputs, calibrate=calibrate)
    v = _values(plan)
    # each phase timed at its CPU batch and at twice it (no faster per image: kept), then again
    # on its crops
    assert calibrate.calls == [
        ("PRETRAIN", 8),
        ("PRETRAIN", 16),
        ("FINETUNE", 4),
        ("FINETUNE", 8),
        ("PRETRAIN", 8),
        ("FINETUNE", 4),
    ]
    # 20 s at 0.5 s per iteration of 4 images: 2 of the 3 epochs at 512 px -> 416-px crops
    assert v["FINETUNE.AUGMENTATION"] == "fixed_size_crop" and v["FINETUNE.CROP_SIZE"] == [416, 416]
    assert v["FINETUNE.MIN_SIZE_TEST"] == 512  # evaluated on whole images still
    assert "FINETUNE.MIN_SIZE_TRAIN" not in v
    assert 128 <= v["PRETRAIN.CROP_SIZE"][0] < v["PRETRAIN.SCALE"][0]
    rows = [c for c in plan["choices"] if c["key"] == "DIRECT_PRETRAIN.FINETUNE.CROP_SIZE"]
    assert len(rows) == 1 and "budget: 416-px random crops" in rows[0]["rule"]


def test_values_you_set_are_kept_and_marked_yours(caplog):
    cfg = get_cfg()
    cfg.merge_from_file(str(DEMO))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[512], [1024], [2048], [4096], [8192]]
    user = {
        "DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN": "demo.yaml",
        "DIRECT_PRETRAIN.PRETRAIN.EPOCHS": "demo.yaml",
        "MODEL.ANCHOR_GENERATOR.SIZES": "the command line",
    }
    plan, planned = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, user=user)
    rows = {c["key"]: c for c in plan["choices"]}
    assert rows["DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN"]["by"] == "yours"
    assert rows["DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN"]["value"] == [256]
    assert tuple(planned.DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN) == (256,)
    # the rest of that group stays the config's, marked as kept with your key
    kept = rows["DIRECT_PRETRAIN.FINETUNE.MAX_SIZE_TRAIN"]
    assert kept["by"] == "kept" and "kept with MIN_SIZE_TRAIN" in kept["rule"]
    assert "DIRECT_PRETRAIN.FINETUNE.SCALE" not in rows  # a shortest-edge phase ignores it
    assert planned.DIRECT_PRETRAIN.PRETRAIN.EPOCHS == 24.0
    assert rows["DIRECT_PRETRAIN.PRETRAIN.EPOCHS"]["by"] == "yours"
    anchors = rows["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert anchors["by"] == "yours" and "matches only" in anchors["warning"]
    # planned keys the user did not set
    assert rows["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]["by"] == "plan"


def test_the_lr_follows_a_batch_you_set():
    user = {"DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH": "the command line"}
    cfg = _planned_cfg().clone()
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH = 32
    plan, planned = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, user=user)
    assert planned.DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH == 32
    assert planned.DIRECT_PRETRAIN.FINETUNE.BASE_LR == pytest.approx(0.04)  # 0.02 x 32 / 16


def test_the_cpu_batch_doubles_only_while_images_per_second_grow_by_over_ten_percent():
    assert cpu_batch({8: 2.0, 16: 3.9}).value == 8  # 4.0 -> 4.1 images/s: within the drift
    assert cpu_batch({8: 2.0, 16: 3.0}).value == 16  # 4.0 -> 5.3
    assert cpu_batch({4: 1.0, 8: 1.5, 16: 3.2}).value == 8  # 4.0 -> 5.3 -> 5.0
    assert "images/s 8: 4.00, 16: 4.10" in cpu_batch({8: 2.0, 16: 3.9}).figure


def test_a_cpu_that_is_faster_per_image_at_larger_batches_gets_them_up_to_the_cap():
    def sublinear(pcfg):  # doubling the batch costs 1.41x the time: 41% more images/s
        batch, phase = pcfg.SOLVER.IMS_PER_BATCH, pcfg.DIRECT_PRETRAIN.PHASE
        calls.append((phase, batch))
        return {"seconds_per_iter": 0.5 * (batch / CPU_BATCH[phase]) ** 0.5, "steps": 4}

    calls = []
    cfg = _planned_cfg().clone()
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 10.0
    dicts = _dataset([(256, 256)], (15, 60))
    system = system_of(cfg)
    inputs = plan_inputs(system, cfg, {"data": "x"}, {}, len(dicts))
    plan = make_plan(system, cfg, dicts, {}, inputs, calibrate=sublinear)
    planned = apply_plan(system, cfg, plan).DIRECT_PRETRAIN
    # each winning doubling checked against the batch before it, timed again
    assert calls == [("PRETRAIN", b) for b in (8, 16, 8, 32, 16)] + [
        ("FINETUNE", b) for b in (4, 8, 4, 16, 8)
    ]
    assert (planned.PRETRAIN.IMS_PER_BATCH, planned.FINETUNE.IMS_PER_BATCH) == (32, 16)
    assert (planned.PRETRAIN.BASE_LR, planned.FINETUNE.BASE_LR) == (0.04, 0.02)
    assert plan["calibration"]["PRETRAIN"]["seconds_per_iter"] == pytest.approx(1.0)
    assert plan["calibration"]["PRETRAIN"]["timed_batches"] == {8: 0.5, 16: 0.5 * 2**0.5, 32: 1.0}
    # a budget whose 5% cannot pay the doubled batch's steps: not timed, and said so
    calls.clear()
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.1  # 0.3 s of probing; a doubling takes ~4 s
    plan = make_plan(system, cfg, dicts, {}, inputs | {"budget_minutes": 0.1}, calibrate=sublinear)
    assert {batch for _, batch in calls} == {8, 4}
    row = next(c for c in plan["choices"] if c["key"] == "DIRECT_PRETRAIN.PRETRAIN.IMS_PER_BATCH")
    assert (row["value"], row["figure"]) == (
        8,
        "images/s 8: 16.00 at 160-px inputs; 16 not timed (~4 s, over 5% of the budget)",
    )


def test_a_cold_first_timing_does_not_pick_a_larger_cpu_batch():
    def cold_then_flat(pcfg):  # the same images/s at every batch, the first timing 30% slower
        batch, phase = pcfg.SOLVER.IMS_PER_BATCH, pcfg.DIRECT_PRETRAIN.PHASE
        calls.append((phase, batch))
        cold = 1.3 if len(calls) == 1 else 1.0
        return {"seconds_per_iter": cold * 0.5 * batch / CPU_BATCH[phase], "steps": 4}

    calls = []
    plan, _ = _plan(_dataset([(256, 256)], (15, 60)), calibrate=cold_then_flat)
    assert calls[:3] == [("PRETRAIN", 8), ("PRETRAIN", 16), ("PRETRAIN", 8)]
    assert plan["calibration"]["PRETRAIN"]["ims_per_batch"] == 8
    assert plan["calibration"]["PRETRAIN"]["timed_batches"] == {8: 0.5, 16: 1.0}


def test_lengths_you_set_beyond_the_budget_are_warned(caplog):
    cfg = get_cfg()
    cfg.merge_from_file(str(DEMO))
    cfg.MODEL.DEVICE = "cpu"
    user = {f"DIRECT_PRETRAIN.{p}.EPOCHS": "demo.yaml" for p in ("PRETRAIN", "FINETUNE")}
    plan, _ = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, user=user, budget=1.0)
    warnings = [c["warning"] for c in plan["choices"] if c.get("warning")]
    assert any("PRETRAIN, FINETUNE) take" in w and "of the 1.0 minutes" in w for w in warnings)


def test_a_pipeline_the_planner_does_not_know_is_refused():
    cfg = _planned_cfg().clone()
    cfg.defrost()
    cfg.DIRECT_PRETRAIN.PIPELINE = ["PRETRAIN", "BOX_DOMAIN", "FINETUNE"]
    with pytest.raises(Exception, match="BUDGET_MINUTES plans the phases.*BOX_DOMAIN"):
        _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg)


def _tiny_budget_cfg(synthetic_data, tmp_path, budget=1.0):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = budget
    cfg.freeze()
    return cfg


def test_a_saved_plan_is_reused_and_a_changed_budget_refused_once_a_phase_started(
    synthetic_data, tmp_path
):
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path)
    system = system_of(cfg)
    dicts = _dataset([(64, 64)], (10, 30))
    calibrate = fake_calibration()
    first, plan = planned_config(system, cfg, dicts, {}, {"tiny": "a"}, calibrate)
    assert {phase for phase, _ in calibrate.calls} == {"PRETRAIN", "FINETUNE"}
    slower = fake_calibration(9.0)
    again, plan2 = planned_config(system, cfg, dicts, {}, {"tiny": "a"}, slower)
    assert plan2 == plan and system.flat(again) == system.flat(first)
    assert slower.calls == []  # not re-calibrated
    other = cfg.clone()
    other.defrost()
    other.DIRECT_PRETRAIN.BUDGET_MINUTES = 2.0
    # nothing trained yet: a new budget is simply re-planned
    planned_config(system, other, dicts, {}, {"tiny": "a"}, fake_calibration())
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "phase_keys.json").write_text("{}")
    with pytest.raises(PlanChangedError, match=r"budget_minutes.*2.0 -> 1.0"):
        planned_config(system, cfg, dicts, {}, {"tiny": "a"}, fake_calibration())
    with pytest.raises(PlanChangedError, match="data"):
        planned_config(system, other, dicts, {}, {"tiny": "b"}, fake_calibration())


def test_the_next_phase_is_replanned_when_the_previous_one_ran_slower(synthetic_data, tmp_path):
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=10.0)
    system = system_of(cfg)
    plan, _ = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, budget=10.0)
    pre_iters = plan["budget_seconds"]["PRETRAIN"] / 0.5
    on_time = {"wall_seconds": plan["budget_seconds"]["PRETRAIN"], "iterations": pre_iters}
    assert replan_after(system, cfg, plan, "PRETRAIN", on_time) is None
    slow = {"wall_seconds": 1.5 * on_time["wall_seconds"] + 30, "eval_seconds": 30}
    slow["iterations"] = pre_iters
    replanned = replan_after(system, cfg, plan, "PRETRAIN", slow)
    assert replanned["phase"] == "FINETUNE"
    # half of PRETRAIN's overrun is taken from FINETUNE, which also runs 1.5x slower
    left = 600 - 1.5 * plan["budget_seconds"]["PRETRAIN"]
    assert replanned["seconds"] == pytest.approx(left, abs=1)
    epochs = replanned["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    assert epochs < plan["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"] / 2
    assert "1.50x the calibrated time" in replanned["reason"]
    assert replanned == replan_after(system, cfg, plan, "PRETRAIN", slow)  # deterministic
    # here the pre-training took the whole budget: the fine-tune runs its minimum, said loudly
    assert replanned["seconds"] == 0 and "under 10 iterations: it runs 10" in replanned["warning"]
    slightly = {**slow, "wall_seconds": 1.2 * on_time["wall_seconds"] + 30}
    assert "warning" not in replan_after(system, cfg, plan, "PRETRAIN", slightly)


def test_plan_only_prints_the_plan_and_trains_nothing(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.5
    config = write_config(cfg, tmp_path / "cfg.yaml")
    result = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", str(config), "--plan-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = yaml.safe_load((tmp_path / PLAN_FILE).read_text())
    assert set(plan["calibration"]) == {"PRETRAIN", "FINETUNE"}
    log = (tmp_path / "log.txt").read_text()
    assert "PRETRAIN.SCALE" in log and "yours" in log and "Budget 0.5 min" in log
    assert f"Planning took {plan['planning_seconds'] / 60:.1f} min" in log
    assert not (tmp_path / "pretrain").exists() and not (tmp_path / "finetune").exists()
    assert (tmp_path / "report" / "box_sizes.png").is_file()
    assert (tmp_path / "fingerprint.json").is_file()


def test_a_budgeted_run_reports_the_budget_against_the_time_used(synthetic_data, tmp_path):
    from direct_pretrain.pipeline import run_pipeline

    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.2
    cfg.freeze()
    summary = run_pipeline(cfg, user_keys={})
    budget = summary["budget"]
    assert budget["minutes"] == 0.2
    assert set(budget["used_seconds"]) == {"PRETRAIN", "FINETUNE"}
    plan = yaml.safe_load((tmp_path / PLAN_FILE).read_text())
    saved = json.loads((tmp_path / "finetune" / "phase_keys.json").read_text())
    planned_epochs = plan["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    for replanned in plan.get("replanned", {}).values():
        planned_epochs = replanned["values"].get("DIRECT_PRETRAIN.FINETUNE.EPOCHS", planned_epochs)
    assert saved["DIRECT_PRETRAIN.FINETUNE.EPOCHS"] == planned_epochs
    assert budget["planning_seconds"] == plan["planning_seconds"] > 0  # calibration, apart
    index = (tmp_path / "report" / "index.md").read_text()
    assert "## Budget: 0.2 minutes" in index and "box_sizes.png" in index
    assert f"{plan['planning_seconds'] / 60:.1f} min, not counted in the budget" in index
    # the same command resumes: nothing is re-planned, both phases are skipped
    again = run_pipeline(cfg, user_keys={})
    assert again["phases"].keys() == summary["phases"].keys()


def test_lazyconfig_runs_are_planned_too(synthetic_data, tmp_path, caplog):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.py"))
    cfg = shrink(cfg, synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 1.0
    system = system_of(cfg)
    with caplog.at_level(logging.INFO):
        planned, plan = planned_config(
            system, cfg, _dataset([(64, 64)], (10, 30)), {}, {"tiny": "a"}, fake_calibration()
        )
    assert "model.proposal_generator.anchor_generator.sizes" in plan["values"]
    assert (
        planned.DIRECT_PRETRAIN.FINETUNE.EPOCHS == plan["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    )
    assert system.resolve(planned, "PRETRAIN").CROP_SIZE == tuple(
        plan["values"]["DIRECT_PRETRAIN.PRETRAIN.CROP_SIZE"]
    )


def test_lazyconfig_values_of_yours_are_saved_in_the_plan(synthetic_data, tmp_path):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.py"))
    cfg = shrink(cfg, synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 1.0
    tmp_path.mkdir(exist_ok=True)
    anchors = "model.proposal_generator.anchor_generator.sizes"
    user = {"DIRECT_PRETRAIN.PRETRAIN.SCALE": "the config", anchors: "the command line"}
    _, plan = planned_config(
        system_of(cfg), cfg, _dataset([(64, 64)], (10, 30)), user, {"tiny": "a"}, fake_calibration()
    )
    rows = {c["key"]: c for c in yaml.safe_load((tmp_path / PLAN_FILE).read_text())["choices"]}
    assert rows["DIRECT_PRETRAIN.PRETRAIN.SCALE"] == {
        **rows["DIRECT_PRETRAIN.PRETRAIN.SCALE"],
        "value": [32, 32],
        "by": "yours",
    }
    assert rows[anchors]["by"] == "yours" and rows[anchors]["value"] == plain(
        cfg.model.proposal_generator.anchor_generator.sizes
    )


@pytest.mark.parametrize(
    "recipe, anchors",
    [
        ("retinanet_R_50_FPN_direct_P1x_1x.yaml", "MODEL.ANCHOR_GENERATOR.SIZES"),
        ("fcos_R_50_FPN_direct_P1x_1x.yaml", None),  # anchor-free: no anchors, no RoIs
    ],
)
def test_one_stage_detectors_are_planned(recipe, anchors):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs" / "COCO" / recipe))
    plan, planned = _plan(_dataset([(640, 640)], (20, 120)), cfg=cfg)
    assert (anchors in plan["values"]) == (anchors is not None)
    assert not any("ROI_BATCH" in k for k in plan["values"])
    if anchors:  # three sizes per level, scaled together, each >= 3x its stride
        sizes = planned.MODEL.ANCHOR_GENERATOR.SIZES
        assert all(len(level) == 3 for level in sizes)
        assert all(min(level) >= 3 * s for level, s in zip(sizes, (8, 16, 32, 64, 128)))
    assert "DIRECT_PRETRAIN.FINETUNE.EPOCHS" in plan["values"]


def test_plan_only_after_the_overrides_is_refused_clearly():
    result = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", str(PLANNED), "SEED", "1", "--plan-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--plan-only must come before the config overrides" in result.stderr


def test_a_saved_replan_is_kept_on_rerun(synthetic_data, tmp_path):
    from direct_pretrain.pipeline import _replan_before

    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=10.0)
    plan, planned = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, budget=10.0)
    (tmp_path / "pretrain").mkdir()
    slow = {"wall_seconds": 10 * plan["budget_seconds"]["PRETRAIN"], "eval_seconds": 0}
    (tmp_path / "pretrain" / "phase_done.json").write_text(json.dumps({**slow, "iterations": 5}))
    system = system_of(cfg)
    replanned = _replan_before(system, planned, plan, "FINETUNE", None)
    saved = plan["replanned"]["FINETUNE"]  # the slow pre-train re-planned the fine-tune
    assert (
        replanned.DIRECT_PRETRAIN.FINETUNE.EPOCHS
        == saved["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    )
    # what the fine-tune started with stays, whatever the rules would say now
    saved["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"] = 1.23
    kept = _replan_before(system, apply_plan(system, cfg, plan), plan, "FINETUNE", None)
    assert kept.DIRECT_PRETRAIN.FINETUNE.EPOCHS == 1.23


def test_the_measured_scale_is_the_largest_within_the_slices_noise_of_the_best():
    assert finetune_candidates(0.5, 0.55) == [0.55]  # close scales: nothing to measure
    assert finetune_candidates(0.25, 1.0) == [0.25, 0.5, 1.0]
    assert pick_measured_scale([0.25, 0.5, 1.0], [8.0, 10.0, 8.9], 10).value == 0.5
    chosen = pick_measured_scale([0.25, 0.5, 1.0], [8.0, 10.0, 9.1], 10)
    assert chosen.value == 1.0 and "10-image validation slice x0.25: 8.0" in chosen.figure
    assert pick_measured_scale([0.25, 0.5, 1.0], [None, 0.0, None], 10).value == 1.0


class _Scorer:
    """Box AP by test size, as if the pre-trained model were evaluated on a 5-image slice."""

    images = 5

    def __init__(self, best_short_side):
        self.best, self.calls = best_short_side, []

    def __call__(self, min_size_test, max_size_test):
        self.calls.append(min_size_test)
        return 20.0 - abs(min_size_test - self.best) / 10


def test_a_long_fine_tune_keeps_the_rules_scale_unmeasured(synthetic_data, tmp_path):
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=10.0)
    dicts = _dataset([(512, 512)], (18, 60))
    plan, _ = _plan(dicts, cfg=cfg, budget=10.0)
    assert plan["budget_seconds"]["FINETUNE"] / 0.5 >= 100  # iterations at the rule's scale
    on_time = {"wall_seconds": plan["budget_seconds"]["PRETRAIN"], "iterations": 1}
    on_time["iterations"] = plan["budget_seconds"]["PRETRAIN"] / 0.5
    scorer, loads = _Scorer(224), []
    load = lambda: loads.append(1) or dicts  # noqa: E731
    assert replan_after(system_of(cfg), cfg, plan, "PRETRAIN", on_time, scorer, load) is None
    assert scorer.calls == [] and loads == []  # neither measured nor the training set loaded


def test_a_short_fine_tune_is_measured_on_the_validation_slice(synthetic_data, tmp_path):
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=1.5)
    system = system_of(cfg)
    dicts = _dataset([(512, 512)], (18, 60))
    plan, _ = _plan(dicts, cfg=cfg, budget=1.5)
    assert plan["budget_seconds"]["FINETUNE"] / 0.5 < 100
    low, high = plan["scales"]["PRETRAIN"], plan["scales"]["FINETUNE"]
    assert high / low > 1.5
    on_time = {"wall_seconds": plan["budget_seconds"]["PRETRAIN"], "iterations": 1}
    on_time["iterations"] = plan["budget_seconds"]["PRETRAIN"] / 0.5
    middle = finetune_candidates(low, high)[1]
    side = 32 * round(512 * middle / 32)  # sizes are multiples of 32 px
    scorer, calibrate = _Scorer(side), fake_calibration(0.25)
    load = lambda: dicts  # noqa: E731
    replanned = replan_after(system, cfg, plan, "PRETRAIN", on_time, scorer, load, calibrate)
    assert len(scorer.calls) == 3 and scorer.calls == sorted(scorer.calls)
    assert replanned["scale"] == middle and calibrate.calls == [("FINETUNE", 4)]
    values = _values(replanned)
    assert values["FINETUNE.MIN_SIZE_TEST"] == side and values["FINETUNE.MIN_SIZE_TRAIN"] == [side]
    # timed at the new scale (twice as fast): more epochs in the same seconds
    assert values["FINETUNE.EPOCHS"] > plan["values"]["DIRECT_PRETRAIN.FINETUNE.EPOCHS"]
    assert "5-image validation slice" in replanned["reason"]
    assert replanned["measured"]["value"] == middle
    again = apply_plan(system, cfg, {**plan, "replanned": {"FINETUNE": replanned}})
    assert again.DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TEST == side
    # the rule's scale measured best: kept, the measurement recorded, the sizes unchanged
    kept = replan_after(system, cfg, plan, "PRETRAIN", on_time, _Scorer(512), load, calibrate)
    assert kept["values"] == {} and kept["measured"]["value"] == high and "kept" in kept["reason"]


def test_a_starved_phase_is_warned_once(synthetic_data, tmp_path, caplog):
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=1.5)
    system, dicts = system_of(cfg), _dataset([(512, 512)], (18, 60))
    with caplog.at_level(logging.WARNING):
        plan = make_plan(
            system,
            cfg,
            dicts,
            {},
            plan_inputs(system, cfg, {"d": "x"}, {}, 40),
            fake_calibration(9.0),
        )
    assert [m for m in caplog.messages if "under 10 iterations" in m]  # the plan says it
    caplog.clear()
    overran = {"wall_seconds": 90.0, "eval_seconds": 0, "iterations": 5}  # the whole budget
    scorer = _Scorer(
        32
        * round(
            512
            * finetune_candidates(plan["scales"]["PRETRAIN"], plan["scales"]["FINETUNE"])[1]
            / 32
        )
    )
    with caplog.at_level(logging.WARNING):
        starved = replan_after(
            system, cfg, plan, "PRETRAIN", overran, scorer, lambda: dicts, fake_calibration(9.0)
        )
    assert starved["seconds"] == 0 and "under 10 iterations" in starved["warning"]
    assert "scale" in starved  # measured and re-planned at another scale, ...
    assert not [m for m in caplog.messages if "under 10 iterations" in m]  # ... said once


def test_a_harmful_anchor_of_yours_is_warned_once(synthetic_data, tmp_path, caplog):
    from direct_pretrain.pipeline import prepare_run

    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.BUDGET_MINUTES = 0.5
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[512], [1024], [2048], [4096], [8192]]
    cfg.freeze()
    user = {"MODEL.ANCHOR_GENERATOR.SIZES": "the command line"}
    with caplog.at_level(logging.WARNING):
        prepare_run(cfg, user)
    warned = [r for r in caplog.records if "MODEL.ANCHOR_GENERATOR.SIZES" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


class _Clock:
    """A phase timer whose training seconds the test sets."""

    def __init__(self) -> None:
        self.seconds, self.eval_seconds = 0.0, 0.0


class _Trainer:
    def __init__(self, max_iter: int) -> None:
        self.iter, self.max_iter = 0, max_iter
        self.model = torch.nn.Linear(1, 1)


class _Saver:
    def __init__(self) -> None:
        self.saved = []

    def save(self, name, iteration):
        self.saved.append((name, iteration))


def _pace(
    budget,
    max_iter,
    seconds_per_iter,
    iterations,
    start=0,
    slow_after=None,
    factor=3,
    until=None,
    min_length=1,
):
    """Run a :class:`BudgetPace` over ``iterations`` steps of a fake phase; the PaceChanged
    raised (or None) and the checkpoints saved."""
    clock, saver, trainer = _Clock(), _Saver(), _Trainer(max_iter)
    hook = BudgetPace(saver, clock, budget, until, min_length)
    hook.trainer = trainer
    clock.seconds = start * seconds_per_iter
    hook.before_train()
    for it in range(start, start + iterations):
        trainer.iter = it
        slow = slow_after is not None and it >= slow_after
        clock.seconds += seconds_per_iter * (factor if slow else 1)
        try:
            hook.after_step()
        except PaceChanged as change:
            return change, saver.saved
    return None, saver.saved


def test_a_phase_that_slows_down_is_replanned_to_fit_its_budget():
    # on pace: 100 iterations of 1 s in 100 s, checked at 25 and 50 s
    assert _pace(100.0, 100, 1.0, 100) == (None, [])
    # 3x slower from iteration 10: at 25 s (iteration 15) 5 slow iterations measured...
    change, saved = _pace(100.0, 100, 1.0, 100, slow_after=10)
    # ... since the first step: (25 - 1) s / 14 iterations; 75 s left fit 43 more
    assert (change.done, change.planned) == (15, 100)
    assert change.seconds_per_iter == pytest.approx(24 / 14)
    assert change.iterations == 15 + int(75 / (24 / 14))
    assert saved == [("model_0000014", 14)]  # the checkpoint the phase resumes from
    # faster than planned: more iterations fit
    change, _ = _pace(100.0, 50, 1.0, 50)
    assert change.iterations == 25 + int(75 / 1.0) and change.planned == 50
    # a slowdown after the half is caught at 3/4 (75 s: iteration 62, speed since the start)
    change, _ = _pace(100.0, 100, 1.0, 100, slow_after=55)
    assert (change.done, change.seconds) == (62, 76.0)
    assert change.iterations == max(62 + int(24 / (75 / 61)), math.ceil(62 * 4 / 3)) == 83
    # a resumed phase past all checks keeps its length
    assert _pace(100.0, 100, 3.0, 10, start=80) == (None, [])
    # an iteration that takes the whole budget: a third more iterations than done at least (an
    # LR step at 3/4 of the phase stays ahead)
    change, _ = _pace(10.0, 1000, 1.0, 100, slow_after=4, factor=20)
    assert (change.done, change.iterations) == (5, 7)
    # ... and never under the phase's minimum length (the planner's 10 iterations)
    change, _ = _pace(10.0, 1000, 1.0, 100, slow_after=4, factor=20, min_length=10)
    assert change.iterations == 10
    # past the first LR drop the length stays (the LR would rise again); so it does at the last
    # iteration (a phase that ends early leaves its time to the next)
    assert _pace(100.0, 40, 2.0, 40, until=10) == (None, [])
    assert _pace(100.0, 13, 2.0, 13) == (None, [])  # 26 s at the last iteration, 13


def test_a_budgeted_run_keeps_pace_with_a_machine_slower_than_its_calibration(
    synthetic_data, tmp_path, monkeypatch, caplog
):
    """The calibration says 10 ms per iteration, the machine is much slower: the pre-training
    stops a quarter into its budget and resumes with the length that fits, saved in the plan;
    a rerun continues the folder, also one stopped before it remembered the new length."""
    import functools

    from direct_pretrain import pipeline

    monkeypatch.setattr(
        pipeline,
        "planned_config",
        functools.partial(planned_config, calibrate=fake_calibration(0.01)),
    )
    cfg = _tiny_budget_cfg(synthetic_data, tmp_path, budget=0.2)
    with caplog.at_level(logging.WARNING):
        summary = pipeline.run_pipeline(cfg, user_keys={})
    plan = yaml.safe_load((tmp_path / PLAN_FILE).read_text())
    changes = plan["paced"]["PRETRAIN"]
    planned = int(plan["budget_seconds"]["PRETRAIN"] / 0.01)
    iterations = changes[-1]["values"]["DIRECT_PRETRAIN.PRETRAIN.MAX_ITER"]
    assert iterations < planned / 4 and "x its calibration" in changes[0]["reason"]
    assert f"instead of {planned}" in changes[0]["reason"] and "trains at" in caplog.text
    assert summary["phases"]["PRETRAIN"]["iterations"] == iterations
    keys_file = tmp_path / "pretrain" / "phase_keys.json"
    assert json.loads(keys_file.read_text())["DIRECT_PRETRAIN.PRETRAIN.MAX_ITER"] == iterations
    assert summary["budget"]["paced"]["PRETRAIN"] == [c["reason"] for c in changes]
    assert "Re-planned during training" in (tmp_path / "report" / "index.md").read_text()
    # stopped after saving the re-plan, before the folder remembered it: continued
    system = system_of(cfg)
    planned_cfg = apply_plan(system, cfg, plan)
    num_images = plan["inputs"]["num_images"]
    before = pipeline._before_last_pace(system, planned_cfg, plan, "PRETRAIN", num_images)
    keys_file.write_text(json.dumps(pipeline._phase_keys(system, before, {})))
    pipeline._check_same_config(system, before, {}, None)
    saved = pipeline._phase_config(system, planned_cfg, "PRETRAIN", num_images)[1]
    pipeline._check_same_config(system, saved, {}, before)
    with pytest.raises(PhaseStateError, match="MAX_ITER"):
        pipeline._check_same_config(system, saved, {}, None)


def test_a_measured_fine_tune_scale_is_drawn_in_the_box_size_figure(
    synthetic_data, tmp_path, monkeypatch
):
    from direct_pretrain import pipeline

    cfg = pipeline.prepare_config(_tiny_budget_cfg(synthetic_data, tmp_path, budget=10.0))[0]
    plan, planned = _plan(_dataset([(256, 256)], (15, 60)), cfg=cfg, budget=10.0)
    (tmp_path / "pretrain").mkdir()
    done = {"wall_seconds": 1.0, "eval_seconds": 0, "iterations": 5, "final_model": "m.pth"}
    (tmp_path / "pretrain" / "phase_done.json").write_text(json.dumps(done))
    drawn = []
    monkeypatch.setattr(pipeline, "describe_anchors", lambda *args: drawn.append(args))
    key = "DIRECT_PRETRAIN.FINETUNE.MAX_SIZE_TEST"
    measured = {"phase": "FINETUNE", "seconds": 1.0, "values": {key: 96}, "reason": "r"}
    monkeypatch.setattr(pipeline, "replan_after", lambda *a: {**measured, "scale": 0.4})
    system = system_of(cfg)
    replanned = pipeline._replan_before(system, planned, plan, "FINETUNE", None)
    assert (
        len(drawn) == 1
        and drawn[0][1] is replanned
        and replanned.DIRECT_PRETRAIN.FINETUNE["MAX_SIZE_TEST"] == 96
    )
    assert len(drawn[0][2]) > 0  # the training set, loaded for the figure
    # a re-plan of the length only leaves the figure as the plan drew it
    del plan["replanned"]
    monkeypatch.setattr(pipeline, "replan_after", lambda *a: measured)
    pipeline._replan_before(system, planned, plan, "FINETUNE", None)
    assert len(drawn) == 1


def test_the_calibration_times_a_large_lr_without_diverging(synthetic_data, tmp_path):
    """The timed steps run from random weights at a warmup's first LR: at the full LR of a large
    batch they diverged (the demo's pre-training at batch 16, LR 0.04)."""
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR = 1000.0
    cfg, num_images = prepare_config(cfg)
    system = system_of(cfg)
    pcfg = system.phase_config(cfg, system.resolve(cfg, "PRETRAIN"), num_images)
    timing = time_steps(pcfg, warmup=1, steps=3)
    assert timing["seconds_per_iter"] > 0 and timing["steps"] == 3
