"""Helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import json
import os
import platform
import resource
import warnings
from datetime import date
from pathlib import Path

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")

import torch  # noqa: E402

from direct_pretrain.config import load_config  # noqa: E402
from direct_pretrain.phases import phase_config  # noqa: E402
from direct_pretrain.pipeline import prepare_config  # noqa: E402

DEMO_CONFIG = "configs/trees/faster_rcnn_R_18_FPN_direct.yaml"


def machine() -> str:
    """One line describing where a benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {date.today().isoformat()}"
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
