"""The project's log lines on the console and in ``log.txt``, as Detectron2 shows its own."""

from __future__ import annotations

import logging

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["setup_project_logger"]


def setup_project_logger(output: str | None) -> logging.Logger:
    """Set up the ``direct_pretrain`` loggers and Python warnings like Detectron2's logger.

    Rank-aware (other processes log to ``log.txt.rank<N>`` only), formatted, on the console
    and in ``output``'s ``log.txt`` (the file Detectron2's ``default_setup`` writes).

    Args:
        output: a folder (``log.txt`` inside it), a ``.txt``/``.log`` file, or None (console).
    """
    rank = comm.get_rank()
    logging.captureWarnings(True)
    setup_logger(output, distributed_rank=rank, name="py.warnings", abbrev_name="warning")
    return setup_logger(output, distributed_rank=rank, name="direct_pretrain", abbrev_name="dp")
