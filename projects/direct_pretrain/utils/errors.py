"""Errors the user can act on: a refused setting, input or run-folder state whose message names
the key, file or value and what to do. The command-line tools print such a message without a
traceback (a traceback is for the project's own faults) and exit with ``EXIT_STATUS``."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

__all__ = ["EXIT_STATUS", "ConfigError", "UserError", "stop"]

# The exit status of a command stopped by a UserError (argparse's for a bad command line).
EXIT_STATUS = 2


class UserError(Exception):
    """Base of the project's refusals; subclasses keep their builtin base (ValueError...) too."""


class ConfigError(UserError, ValueError):
    """The config file or its command-line overrides cannot be read (a missing file, an unknown
    key, a value of the wrong type)."""


def stop(error: UserError) -> NoReturn:
    """Log ``error`` as the reason the command stopped (console and ``log.txt``; before the log
    is set up, Python's last-resort handler prints it on stderr) and exit with ``EXIT_STATUS``."""
    logging.getLogger("direct_pretrain").error("Stopped: %s: %s", type(error).__name__, error)
    sys.exit(EXIT_STATUS)
