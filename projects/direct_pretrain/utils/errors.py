"""Errors the user can act on: a refused setting, input or run-folder state whose message names
the key, file or value and what to do. The command-line tools print such a message without a
traceback (a traceback is for the project's own faults) and exit with ``EXIT_STATUS``."""

from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn

from detectron2.utils import comm

__all__ = ["EXIT_STATUS", "ConfigError", "UserError", "stop"]

# The exit status of a command stopped by a UserError (argparse's for a bad command line).
EXIT_STATUS = 2


class UserError(Exception):
    """Base of the project's refusals; subclasses keep their builtin base (ValueError...) too."""


class ConfigError(UserError, ValueError):
    """The config file or its command-line overrides cannot be read (a missing file, an unknown
    key, a value of the wrong type)."""


def stop(error: Exception, cleanup: Callable[[], None] | None = None) -> NoReturn:
    """Log ``error`` as the reason the command stopped (console and ``log.txt``; before the log
    is set up, Python's last-resort handler prints it on stderr, from the main process only: the
    others stop for the same reason), run ``cleanup`` (e.g. end the process group) and exit
    with ``EXIT_STATUS``."""
    logger = logging.getLogger("direct_pretrain")
    if logger.hasHandlers() or comm.get_rank() == 0:
        logger.error("Stopped: %s: %s", type(error).__name__, error)
    if cleanup is not None:
        cleanup()
    sys.exit(EXIT_STATUS)
