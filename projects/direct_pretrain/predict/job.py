"""A prediction job's settings, saved in its output folder so that a rerun continues only the
same job: ``predict_settings.json`` (the model file's identity and every setting that changes
the detections)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..utils.errors import UserError
from ..utils.io import atomic_write_json, flatten_dict
from .writers import CSV_FILE, DRAWN_DIR, IMAGES_FILE, JOBS_FILE, RESULTS_FILE

__all__ = ["SETTINGS_FILE", "SettingsMismatchError", "file_identity", "start_job"]

SETTINGS_FILE = "predict_settings.json"


class SettingsMismatchError(UserError, ValueError):
    """The output folder holds predictions made with other settings."""


def file_identity(path: str | os.PathLike) -> dict:
    """A model file's absolute path, size and modification time (a retrained or replaced
    file differs); the path alone for what is no local file (e.g. a URL)."""
    if not os.path.isfile(path):
        return {"path": str(path)}
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def start_job(output_dir: str | os.PathLike, settings: dict, overwrite: bool = False) -> None:
    """Start or continue the prediction job in ``output_dir`` with ``settings`` (JSON data).

    A folder whose saved settings differ (or that holds predictions without saved settings)
    is refused, naming the differences; ``overwrite`` removes its predictions instead.

    Raises:
        SettingsMismatchError: the differences, and what to do.
    """
    out = Path(output_dir)
    saved_file, jobs = out / SETTINGS_FILE, out / JOBS_FILE
    settings = json.loads(json.dumps(settings))  # as it reads back (lists, not tuples)
    if overwrite:
        for name in (JOBS_FILE, RESULTS_FILE, IMAGES_FILE, CSV_FILE, SETTINGS_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / DRAWN_DIR, ignore_errors=True)
    elif saved_file.is_file():
        saved = flatten_dict(json.loads(saved_file.read_text()))
        now = flatten_dict(settings)
        differ = [
            f"{key}: {saved.get(key, '(none)')} before, {now.get(key, '(none)')} now"
            for key in sorted(saved.keys() | now.keys())
            if saved.get(key) != now.get(key)
        ]
        if differ:
            raise SettingsMismatchError(
                f"{out} holds predictions made with other settings ({SETTINGS_FILE}): "
                + "; ".join(differ)
                + ". Pass --overwrite to replace them, or choose another --output."
            )
    elif jobs.is_file():
        raise SettingsMismatchError(
            f"{out} holds predictions ({JOBS_FILE}) without {SETTINGS_FILE}: their settings "
            "are unknown. Pass --overwrite to replace them, or choose another --output."
        )
    atomic_write_json(saved_file, settings)
