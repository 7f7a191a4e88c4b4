"""Load a finished run for inference: its config (last phase, resolved) and final weights."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.config import LazyConfig
from omegaconf import DictConfig

from ..config import get_cfg
from ..config_systems import system_of
from ..phase_kinds import phase_kind
from ..phases import active_phases
from ..run_folder import (
    DONE_FILE,
    FINAL_MODEL,
    PHASE_CONFIG_FILE,
    PREDICT_CONFIG_FILE,
    ended_phase,
    final_model_phase,
    last_checkpoint_text,
    last_phase_config,
    read_done,
    read_predict_threshold,
    run_last_phase,
    saved_pixel_stats,
)
from ..utils.errors import UserError

__all__ = [
    "DEFAULT_SCORE_THRESHOLD",
    "UnfinishedPhaseError",
    "load_predict_config",
    "load_run",
    "run_score_threshold",
]

# The lowest score predicted with a model whose run saved no threshold for it.
DEFAULT_SCORE_THRESHOLD = 0.5


class UnfinishedPhaseError(UserError, RuntimeError):
    """The phase whose final model was asked for has not finished."""


def load_run(
    run_dir: str | os.PathLike,
    opts: Sequence[str] = (),
    device: str | None = None,
    phase: str | None = None,
):
    """The inference config of a finished run, with its weights ``run_dir/model_final.pth``.

    Reads the run's ``config_predict.yaml`` (or, for runs without it, the ``phase_config.yaml``
    of the phase whose final model it is, :func:`final_model_phase`): the final model, its pixel
    mean/std as trained and that phase's test size. ``DefaultPredictor(load_run(run_dir))``
    predicts with it.

    Args:
        run_dir: the run's ``OUTPUT_DIR``.
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``a.b=c`` (LazyConfig runs).
        device: "cpu" or "cuda"; default: "cuda" if available, else "cpu".
        phase: a finished phase of the run whose final model to use instead
            (``run_dir/<phase>/model_final.pth`` with its ``phase_config.yaml``).

    Returns:
        A frozen yacs ``CfgNode``, or a LazyConfig ``DictConfig`` for LazyConfig runs.

    Raises:
        UnfinishedPhaseError: ``model_final.pth`` is not the final model of the run's last
            phase (that phase, or the run, did not finish), or ``phase`` has not finished.
        ValueError: ``phase`` is not one of the run's phases or its model is not a detector.
    """
    run = Path(run_dir)
    if phase:
        weights, config = _phase_files(run, phase.upper())
        return load_predict_config(str(config), str(weights), opts, device)
    weights = run / FINAL_MODEL
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: '{run}' is not a finished run (train_net.py writes "
            f"{FINAL_MODEL} after the last phase)"
        )
    _check_last_phase(run)
    config = run / PREDICT_CONFIG_FILE
    if not config.is_file():
        config = last_phase_config(run)
    return load_predict_config(str(config), str(weights), opts, device)


def run_score_threshold(
    run_dir: str | os.PathLike, phase: str | None = None
) -> tuple[float, str] | None:
    """The score threshold the run saved for its final model (the one that maximises F1 on
    its test set, ``predict_threshold.json``) and where it comes from, for a log line; None if
    it saved none, or ``phase`` names another phase's final model."""
    saved = read_predict_threshold(Path(run_dir))
    if saved is None or (phase and phase.upper() != saved["phase"]):
        return None
    return float(saved["score_threshold"]), f"the run's F1-best on {saved['dataset']}"


def _check_last_phase(run: Path) -> None:
    """Refuse a run whose ``model_final.pth`` is not the final model of its last phase."""
    last, built = run_last_phase(run), final_model_phase(run)
    if last is None:
        return
    folder = run / last.lower()
    done = read_done(folder) is not None
    # A finished run's phase folders may have been deleted to save space.
    if last == ended_phase(run) and (done or not folder.is_dir()):
        return
    state = (
        "has finished, but the run stopped before writing its final model"
        if done
        else f"has not finished ({last_checkpoint_text(folder)}; no {DONE_FILE})"
    )
    source = f"the final model of {built} from an earlier run" if built else "from an earlier run"
    hint = last if done else built or "NAME (a finished phase)"
    raise UnfinishedPhaseError(
        f"{run}: its last phase {last} {state}; {FINAL_MODEL} is {source}. "
        f"Rerun train_net.py with the same command to finish it, or pass --phase {hint} to "
        "predict with that phase's final model."
    )


def _phase_files(run: Path, phase: str) -> tuple[Path, Path]:
    """The final model and the config of the run's finished phase ``phase``."""
    folder = run / phase.lower()
    if not (folder / PHASE_CONFIG_FILE).is_file():
        phases = sorted(p.parent.name.upper() for p in run.glob(f"*/{PHASE_CONFIG_FILE}"))
        raise ValueError(f"{run} has no phase {phase} (its phases: {', '.join(phases)})")
    if not phase_kind(phase).evaluates:
        raise ValueError(
            f"{run}: the model of phase {phase} is not a detector (e.g. AlignDet box-domain "
            "pre-training); predict with a phase that fine-tunes it"
        )
    if read_done(folder) is None:
        raise UnfinishedPhaseError(
            f"{run}: phase {phase} has not finished ({last_checkpoint_text(folder)}; no "
            f"{DONE_FILE}). Rerun train_net.py with the same command to finish it."
        )
    return folder / FINAL_MODEL, folder / PHASE_CONFIG_FILE


def _is_lazy_file(path: str) -> bool:
    """Whether ``path`` is a LazyConfig (``.py``, or saved ``.yaml`` with a top-level
    ``model``) rather than a yacs config (top-level ``MODEL``)."""
    if path.endswith(".py"):
        return True
    with open(path, encoding="utf-8") as f:  # top-level keys only (saved LazyConfigs hold
        top = {line.partition(":")[0] for line in f if line[:1].isalpha()}  # python tags)
    return "model" in top and "MODEL" not in top


def load_predict_config(
    config_file: str,
    weights: str | None = None,
    opts: Sequence[str] = (),
    device: str | None = None,
):
    """An inference config from a config file: a run's saved config (``config_predict.yaml``,
    a ``phase_config.yaml``), a project training config (its last phase is used) or a plain
    Detectron2 config.

    Args:
        config_file: yacs ``.yaml`` or LazyConfig ``.py``/saved ``.yaml``.
        weights: the model weights; else ``MODEL.WEIGHTS`` (``train.init_checkpoint``).
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``a.b=c`` (LazyConfig).
        device: "cpu" or "cuda"; default: "cuda" if available, else "cpu".

    Raises:
        ValueError: naming the file: no weights; a training config whose pixel statistics
            were computed on the training set and are saved neither with the weights nor in
            the config; a last phase that is not a detector (BOX_DOMAIN).
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file '{config_file}' not found")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_lazy_file(config_file):
        cfg = LazyConfig.load(config_file)
        cfg.train.device = device
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
        weights_key, project = "train.init_checkpoint", "DIRECT_PRETRAIN" in cfg
    else:
        cfg = get_cfg()
        cfg.merge_from_file(config_file)
        cfg.MODEL.DEVICE = device
        cfg.merge_from_list(list(opts))
        weights_key = "MODEL.WEIGHTS"
        project = cfg.DIRECT_PRETRAIN != get_cfg().DIRECT_PRETRAIN
    system = system_of(cfg)
    weights = weights or _option(opts, weights_key)
    if project:  # a training or phase config: resolve its last phase
        if not weights:
            raise ValueError(
                f"{config_file} is a training or phase config: its {weights_key} is where "
                f"training started, not the trained model. Pass the trained weights "
                f"({weights_key} ...), or predict with the run folder (--run OUTPUT_DIR)."
            )
        cfg = _with_saved_pixel_stats(system, cfg, weights, config_file)
        cfg = system.phase_config(cfg, _last_phase(cfg, config_file), 1)
    cfg = system.with_weights(cfg, str(weights)) if weights else cfg
    if not system.weights(cfg):
        raise ValueError(f"{config_file}: no weights (set {weights_key})")
    if not isinstance(cfg, DictConfig):
        cfg.freeze()
    return cfg


def _option(opts: Sequence[str], key: str) -> str:
    """The value of ``key`` in ``KEY VALUE`` (or ``key=value``) overrides, else ""."""
    opts = list(opts)
    for i, opt in enumerate(opts):
        if opt == key and i + 1 < len(opts):
            return opts[i + 1]
        if opt.startswith(key + "="):
            return opt.partition("=")[2]
    return ""


def _with_saved_pixel_stats(system, cfg, weights: str, config_file: str):
    """``cfg`` with the pixel statistics the model trained with, if computed on its data."""
    node = cfg.DIRECT_PRETRAIN
    if node.PIXEL_STATS != "dataset":
        return cfg
    saved = saved_pixel_stats(weights) if weights.endswith(".pth") else None
    if saved is not None:
        return system.with_pixel_stats(cfg, *saved)
    if node.PHASE:  # a phase_config.yaml holds the statistics its phase trained with
        return cfg
    raise ValueError(
        f"{config_file} has DIRECT_PRETRAIN.PIXEL_STATS 'dataset' (pixel mean/std computed "
        f"on the training set when it trains), and neither {weights} nor the folder beside it "
        "holds the values the model trained with. Predict with the run folder (--run "
        "OUTPUT_DIR) or its config_predict.yaml, or set MODEL.PIXEL_MEAN/PIXEL_STD with "
        "DIRECT_PRETRAIN.PIXEL_STATS config."
    )


def _last_phase(cfg, config_file: str) -> str:
    phase = active_phases(cfg)[-1]
    if not phase_kind(phase).evaluates:
        raise ValueError(
            f"{config_file}: the last phase is {phase} (e.g. AlignDet box-domain "
            "pre-training), whose model is not a detector; fine-tune it first"
        )
    return phase
