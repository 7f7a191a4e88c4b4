"""Helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date
from pathlib import Path

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

import torch  # noqa: E402

from direct_pretrain.config_systems import load_config  # noqa: E402
from direct_pretrain.config_systems import phase_config  # noqa: E402
from direct_pretrain.pipeline import prepare_config  # noqa: E402
from direct_pretrain.report import ap_vs_time  # noqa: E402

DEMO_CONFIG = "configs/trees/faster_rcnn_R_18_FPN_direct.yaml"
# A short run of the demo detector for the prediction benchmarks: the fine-tune phase alone
# from random init, about 8 iterations (its speed is the trained model's, its AP is not).
PREDICT_RUN_CONFIG = "configs/trees/faster_rcnn_R_18_FPN_scratch.yaml"
PREDICT_RUN_OPTS = [
    "DIRECT_PRETRAIN.FINETUNE.EPOCHS",
    "0.6",
    "DIRECT_PRETRAIN.FINETUNE.STEP_EPOCHS",
    "()",
    "DIRECT_PRETRAIN.FINETUNE.WARMUP_ITERS",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def machine(threads: int | None = None) -> str:
    """One line describing where a benchmark ran (``threads``: those of the measured
    processes, if not this one's)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
        f"{threads or torch.get_num_threads()} threads; {date.today().isoformat()}"
    )


def phase_cfg(config_file: str, opts: list[str], phase: str, changes: dict | None = None):
    """The resolved config of ``phase``, after applying ``changes`` to its phase node."""
    cfg = load_config(config_file, opts)
    cfg.defrost()
    for key, value in (changes or {}).items():
        cfg.DIRECT_PRETRAIN[phase][key] = value
    cfg, num_images = prepare_config(cfg)
    return phase_config(cfg, phase, num_images)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def run_training(
    config: str, folder: Path, opts: list[str], env: dict[str, str] | None = None
) -> None:
    """Run train_net.py on ``config`` into ``folder`` (skipped if finished: a rerun continues
    an interrupted run), its output appended to ``folder/stdout.log``; ``env`` is added to
    this process's environment."""
    if (folder / "summary.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train_net.py", "--config-file", config, "OUTPUT_DIR", str(folder)]
    cmd += opts
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(folder / "stdout.log", "a") as log:
        subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, **(env or {})}
        )
    print(f"  done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def predict_run(run: str | None, folder: Path) -> Path:
    """``run`` if given, else a short demo-detector run trained into ``folder`` (reused when
    finished)."""
    if run:
        return Path(run)
    run_training(PREDICT_RUN_CONFIG, folder, PREDICT_RUN_OPTS)
    return folder


def collect_run(folder: Path, clock: str = "wall") -> dict:
    """Box AP and AP50 of a finished train_net.py run's final model, its training seconds
    (evaluation excluded; with ``clock`` "cpu" also its CPU seconds) and its AP-vs-time
    curves on that clock (:func:`direct_pretrain.report.ap_vs_time`)."""
    summary = json.loads((folder / "summary.json").read_text())
    records = {
        p: json.loads((folder / p.lower() / "phase_done.json").read_text())
        for p in summary["phases"]
    }
    final = summary["phases"][summary.get("final_phase") or list(summary["phases"])[-1]]
    result = {
        "AP": final["AP"],
        "AP50": final["AP50"],
        "train_seconds": sum(r["wall_seconds"] - r["eval_seconds"] for r in records.values()),
        "curves": ap_vs_time(records, clock),
    }
    if clock == "cpu":
        result["train_cpu_seconds"] = sum(
            r["cpu_seconds"] - r["eval_cpu_seconds"] for r in records.values()
        )
    return result


def mean_std(values: list[float]) -> str:
    """``mean +- standard deviation`` to one decimal (``+- 0.0`` for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {spread:.1f}"
