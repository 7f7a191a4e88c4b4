"""Every setting is applied or refused before anything trains, every run says what it does, and
nothing stale is reused (issue: "Your data, your settings")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from direct_pretrain import get_cfg
from direct_pretrain.config_systems import lazy_phase_config, load_config
from direct_pretrain.phases import PhaseConfigError
from direct_pretrain.pipeline import PhaseStateError, evaluate_weights, run_pipeline
from direct_pretrain.utils.errors import EXIT_STATUS

from conftest import ROOT, tiny_cfg, train_net, write_config

DEMO = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.yaml")
LAZY_DEMO = str(ROOT / "configs" / "trees" / "faster_rcnn_R_18_FPN_direct.py")


def _own_data(synthetic_data, folder: Path) -> dict[str, tuple[str, str]]:
    """A private copy of the synthetic data (tests edit it)."""
    out = {}
    for split, (json_file, images) in synthetic_data.items():
        shutil.copytree(Path(images).parent, folder / split)
        out[split] = (str(folder / split / Path(json_file).name), str(folder / split / "images"))
    return out


@pytest.mark.parametrize(
    "key, value, instead",
    [
        ("SOLVER.BASE_LR", "0.5", "DIRECT_PRETRAIN.PRETRAIN.BASE_LR"),
        ("SOLVER.IMS_PER_BATCH", "2", "DIRECT_PRETRAIN.FINETUNE.IMS_PER_BATCH"),
        ("SOLVER.MAX_ITER", "5", "EPOCHS or MAX_ITER in DIRECT_PRETRAIN.PRETRAIN"),
        ("INPUT.MIN_SIZE_TRAIN", "(200,)", "DIRECT_PRETRAIN.FINETUNE.MIN_SIZE_TRAIN"),
        ("MODEL.RESNETS.NORM", "GN", "DIRECT_PRETRAIN.PRETRAIN.BACKBONE_NORM"),
    ],
)
def test_phase_controlled_keys_on_the_command_line_are_refused(key, value, instead):
    with pytest.raises(PhaseConfigError) as info:
        load_config(DEMO, [key, value])
    message = str(info.value)
    assert key in message and "the command line" in message and instead in message


def test_phase_controlled_keys_in_a_users_file_are_refused(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f'_BASE_: "{DEMO}"\nSOLVER:\n  BASE_LR: 0.3\n')
    with pytest.raises(PhaseConfigError, match=rf"SOLVER.BASE_LR = 0.3 \(from {mine}\)"):
        load_config(str(mine))
    # Values equal to Detectron2's and the model zoo's count as unset; an integer for a float
    # key is accepted.
    mine.write_text(f'_BASE_: "{DEMO}"\nSOLVER:\n  BASE_LR: 0.02\n')
    cfg = load_config(str(mine), ["DIRECT_PRETRAIN.PRETRAIN.EPOCHS", "2"])
    assert cfg.DIRECT_PRETRAIN.PRETRAIN.EPOCHS == 2.0
    mine.write_text(f'_BASE_: "{DEMO}"\nDIRECT_PRETRAIN:\n  FINETUNE:\n    EPOCHS: 3\n')
    assert load_config(str(mine)).DIRECT_PRETRAIN.FINETUNE.EPOCHS == 3.0


def test_lazy_phase_controlled_overrides_and_unappliable_settings_are_refused():
    with pytest.raises(PhaseConfigError, match=r"optimizer.lr = 0.5 .*PRETRAIN.BASE_LR"):
        load_config(LAZY_DEMO, ["optimizer.lr=0.5"])
    cfg = load_config(LAZY_DEMO, ["train.device=cpu", "DIRECT_PRETRAIN.FINETUNE.FREEZE_AT=2"])
    # FREEZE_AT lands on the ResNet even though the common model config does not list it.
    phase = lazy_phase_config(cfg, "FINETUNE", 16)
    assert phase.model.backbone.bottom_up.freeze_at == 2
    cfg.model.backbone.bottom_up._target_ = "torch.nn.Identity"
    with pytest.raises(PhaseConfigError, match=r"FINETUNE.FREEZE_AT = 2 .*bottom_up.freeze_at"):
        lazy_phase_config(cfg, "FINETUNE", 16)


def test_unused_initial_weights_are_refused(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.MODEL.WEIGHTS = "imagenet.pkl"
    with pytest.raises(PhaseConfigError, match=r"MODEL.WEIGHTS = 'imagenet.pkl' would be ignored"):
        run_pipeline(cfg)
    assert not (tmp_path / "pretrain").exists()


def test_wrong_class_count_is_refused_before_training(synthetic_data, tmp_path):
    for value in (0, 3):
        cfg = tiny_cfg(synthetic_data, tmp_path)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = value
        with pytest.raises(
            PhaseConfigError,
            match=rf"MODEL.ROI_HEADS.NUM_CLASSES = {value}, but the training set 'tiny_train' "
            r"has 1 categories \(box\): set MODEL.ROI_HEADS.NUM_CLASSES 1",
        ):
            run_pipeline(cfg)
    assert not (tmp_path / "pretrain").exists()
    data = _own_data(synthetic_data, tmp_path / "data")
    val = json.loads(Path(data["val"][0]).read_text())
    val["categories"] = [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}]
    Path(data["val"][0]).write_text(json.dumps(val))
    cfg = tiny_cfg(data, tmp_path)
    with pytest.raises(PhaseConfigError, match=r"'tiny_val' has the categories \['box', 'disc'\]"):
        run_pipeline(cfg)


def test_retinanet_class_count_is_checked(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 80
    with pytest.raises(PhaseConfigError, match="MODEL.RETINANET.NUM_CLASSES = 80"):
        run_pipeline(cfg)


@pytest.fixture(scope="module")
def stats_run(synthetic_data, tmp_path_factory):
    """A finished tiny run with dataset pixel statistics, on its own copy of the data."""
    root = tmp_path_factory.mktemp("stats_run")
    data = _own_data(synthetic_data, root / "data")
    cfg = tiny_cfg(data, root / "run", root / "cache")
    cfg.DIRECT_PRETRAIN.PIXEL_STATS = "dataset"
    return cfg, data, root / "run", run_pipeline(cfg)


def test_changed_data_is_refused_and_finished_work_kept(stats_run):
    cfg, data, out, _ = stats_run
    done = out / "pretrain" / "phase_done.json"
    stamp = done.stat().st_mtime_ns
    train = json.loads(Path(data["train"][0]).read_text())
    original = json.dumps(train)
    train["annotations"][0]["bbox"][0] += 1  # one box moved, same images
    Path(data["train"][0]).write_text(json.dumps(train))
    try:
        with pytest.raises(PhaseStateError, match=r"data changed since: dataset\(s\) 'tiny_train'"):
            run_pipeline(cfg)
    finally:
        Path(data["train"][0]).write_text(original)
    assert done.stat().st_mtime_ns == stamp
    run_pipeline(cfg)  # the original data again: accepted, finished phases skipped


def test_eval_only_needs_no_training_set(stats_run):
    cfg, data, out, summary = stats_run
    cfg = cfg.clone()
    cfg.DIRECT_PRETRAIN.REGISTER_COCO = [["tiny_val", *data["val"]]]
    cfg.DATASETS.TRAIN = ("a_training_set_not_registered_here",)
    results = evaluate_weights(cfg, str(out / "model_final.pth"))
    assert results["bbox"]["AP"] == pytest.approx(summary["phases"]["FINETUNE"]["AP"])
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert len(saved["pixel_mean"]) == 3 and saved["pixel_mean"] != list(get_cfg().MODEL.PIXEL_MEAN)


def test_attempt_without_checkpoint_restarts_with_the_fixed_config(synthetic_data, tmp_path):
    cfg = tiny_cfg(synthetic_data, tmp_path)
    folder = tmp_path / "pretrain"
    folder.mkdir(parents=True)
    # What a run that failed before its first checkpoint leaves behind: its config only.
    (folder / "phase_keys.json").write_text(json.dumps({"DIRECT_PRETRAIN.PRETRAIN.BASE_LR": 9.0}))
    summary = run_pipeline(cfg)
    assert set(summary["phases"]) == {"PRETRAIN", "FINETUNE"}
    keys = json.loads((folder / "phase_keys.json").read_text())
    assert keys["DIRECT_PRETRAIN.PRETRAIN.BASE_LR"] == cfg.DIRECT_PRETRAIN.PRETRAIN.BASE_LR


def test_train_net_shows_every_phase_on_the_console_and_in_log_txt(synthetic_data, tmp_path):
    data = _own_data(synthetic_data, tmp_path / "data")  # its annotations get edited below
    cfg = tiny_cfg(data, tmp_path / "run")
    cfg.DIRECT_PRETRAIN.REGISTER_COCO = [
        *cfg.DIRECT_PRETRAIN.REGISTER_COCO,
        ["forgotten_train", *data["train"]],
    ]
    cfg.MODEL.DEVICE = "cuda"
    config = write_config(cfg, tmp_path / "tiny.yaml")  # as a run's config.yaml: reusable

    def run(returncode: int = 0) -> str:
        proc = train_net(config)
        assert proc.returncode == returncode, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    first = run()
    log = (tmp_path / "run" / "log.txt").read_text()
    expected = [
        "Phase PRETRAIN: starting, 2 iterations",
        "Phase FINETUNE: bridging the final model of phase PRETRAIN",
        "Phase FINETUNE: starting, 2 iterations",
        "registers ['forgotten_train'], but no phase uses it",
    ]
    if not torch.cuda.is_available():
        expected.append("MODEL.DEVICE = cuda, but no GPU is available: running on CPU")
    for line in expected:
        assert line in first and line in log, line
    second = run()
    for phase in ("PRETRAIN", "FINETUNE"):
        line = f"Phase {phase}: already finished in"
        assert line in second and line in (tmp_path / "run" / "log.txt").read_text()
    # An annotation edited: the refusal, why the run stopped, reaches log.txt as well.
    train_json = Path(data["train"][0])
    coco = json.loads(train_json.read_text())
    coco["annotations"][0]["bbox"][2] += 1
    train_json.write_text(json.dumps(coco))
    third = run(returncode=EXIT_STATUS)
    line = "Stopped: PhaseStateError: "
    assert line in third and line in (tmp_path / "run" / "log.txt").read_text()
    assert "Traceback" not in third  # a refusal: its reason, not the code's path to it
    assert "the data changed since" in (tmp_path / "run" / "log.txt").read_text()
    # The saved pipeline config records what ran: no phase-controlled keys, and it loads.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert not {"BASE_LR", "MAX_ITER", "IMS_PER_BATCH"} & saved["SOLVER"].keys()
    assert "NORM" not in saved["MODEL"]["RESNETS"] and "MIN_SIZE_TRAIN" not in saved["INPUT"]
    again = get_cfg()
    again.merge_from_file(str(tmp_path / "run" / "config.yaml"))
    assert again.DIRECT_PRETRAIN.PRETRAIN.MAX_ITER == 2
