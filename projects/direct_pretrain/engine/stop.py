"""Graceful stop: SIGTERM, SIGINT and SIGUSR1 end a phase after the current iteration, with a
checkpoint, on every process at the same iteration."""

from __future__ import annotations

import logging
import signal
import threading

from detectron2.engine import HookBase

from ..utils.dist import all_reduce_floats

__all__ = ["STOP_SIGNALS", "GracefulStop", "StopRequested"]

logger = logging.getLogger(__name__)

# SIGUSR1: what SLURM can send before a job's time limit (``--signal=USR1@<seconds>``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequested(BaseException):
    """A stop signal ended the phase after a checkpoint (a ``BaseException``, like
    ``KeyboardInterrupt``: training code that catches ``Exception`` lets it through).

    Attributes:
        signum: the signal; ``exit_code`` is the shell's 128 + signal number.
    """

    def __init__(self, signum: int, iteration: int, max_iter: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"Stopped by {name} at iteration {iteration} of {max_iter}; rerun the same command "
            "to continue"
        )


class GracefulStop(HookBase):
    """Turns a stop signal into a checkpoint and :class:`StopRequested` after the current
    iteration; a second signal stops at once. With several processes the request is shared
    (one all-reduce per iteration), so every process stops at the same iteration.

    Put it last among the hooks: the others finish the iteration first.
    """

    def __init__(self, checkpointer) -> None:
        self.checkpointer = checkpointer
        self.requested = 0
        self._previous: dict[int, object] = {}

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set there
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def after_train(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now, as without this hook
            self.after_train()
            signal.raise_signal(signum)
            return
        self.requested = signum
        logger.warning(
            "%s received: stopping after the current iteration, with a checkpoint (send it "
            "again to stop at once).",
            signal.Signals(signum).name,
        )

    def after_step(self) -> None:
        signum = int(all_reduce_floats([float(self.requested)], self.trainer.model, "max")[0])
        if not signum:
            return
        iteration = self.trainer.iter
        self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        raise StopRequested(signum, iteration + 1, self.trainer.max_iter)
