"""Budget pace: a phase that trains slower or faster than its calibration said stops, with a
checkpoint, to be re-planned to the iterations that fit its budget (the pipeline resumes it with
the new length: Detectron2's loop fixes its length when it starts)."""

from __future__ import annotations

import math

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.dist import all_reduce_floats

__all__ = ["BudgetPace", "PaceChanged"]


class PaceChanged(BaseException):
    """The phase stopped after a checkpoint because its length no longer fits its budget
    (a ``BaseException``, like :class:`~.stop.StopRequested`: not a training error).

    Attributes:
        done: iterations done (the checkpoint's iteration + 1).
        iterations: the phase's new length, in iterations.
        planned: its length before.
        seconds_per_iter: the speed measured since the phase (re)started.
        seconds: training seconds used so far (evaluation apart).
    """

    def __init__(
        self, done: int, iterations: int, planned: int, seconds_per_iter: float, seconds: float
    ) -> None:
        self.done, self.iterations, self.planned = done, iterations, planned
        self.seconds_per_iter, self.seconds = seconds_per_iter, seconds
        super().__init__(
            f"at iteration {done}, {seconds_per_iter:.2f} s per iteration: {iterations} "
            f"iterations fit the budget (planned {planned})"
        )


class BudgetPace(HookBase):
    """Once the phase's training time (``timer``: a :class:`~.hooks.PhaseTimer`; evaluation
    apart) passes each share ``at`` of ``budget_seconds``, predicts the phase's end from the speed
    measured since its first iteration in this process (startup left out). When the prediction
    misses the budget by more than ``tolerance`` of it, saves a checkpoint and raises
    :class:`PaceChanged` with the iterations that fit. Only before iteration ``until`` (the
    phase's first LR drop: the LR never rises again) and before the last iteration (a phase that
    ends early leaves its time to the next one); the remaining iterations stay at least a third
    of those done, so that an LR drop at 3/4 of the phase is still ahead, and the length at least
    ``min_length``.

    The main process decides; with several processes its decision is shared (one all-reduce
    per iteration), so every process stops at the same iteration.
    """

    def __init__(
        self,
        checkpointer,
        timer,
        budget_seconds: float,
        until: int | None = None,
        min_length: int = 1,
        at: tuple[float, ...] = (0.25, 0.5, 0.75),
        tolerance: float = 0.1,
        min_iterations: int = 3,
    ) -> None:
        self.checkpointer, self.timer = checkpointer, timer
        self.budget_seconds, self.at, self.tolerance = budget_seconds, at, tolerance
        self.until, self.min_length = until, min_length
        self.min_iterations = min_iterations
        self._start: tuple[int, float] | None = None
        self._due: list[float] = []

    def _used(self) -> float:
        return self.timer.seconds - self.timer.eval_seconds

    def before_train(self) -> None:
        used = self._used()  # a resumed phase has used some already
        self._due = [share * self.budget_seconds for share in self.at]
        self._due = [due for due in self._due if due > used]
        self._start = None

    def after_step(self) -> None:
        done, used = self.trainer.iter + 1, self._used()
        if self._start is None:
            self._start = (done, used)
        change = self._decide(done, used) if comm.is_main_process() else None
        # the main process's decision, on every process (the others add zeros)
        iterations, speed, used = all_reduce_floats(change or [0.0, 0.0, 0.0], self.trainer.model)
        if not iterations:
            return
        self.checkpointer.save(f"model_{done - 1:07d}", iteration=done - 1)
        raise PaceChanged(done, int(iterations), self.trainer.max_iter, speed, used)

    def _decide(self, done: int, used: float) -> list[float] | None:
        """(new length, seconds per iteration, seconds used), or None while on pace."""
        if not self._due or used < self._due[0]:
            return None
        self._due = [due for due in self._due if due > used]
        last = min(self.trainer.max_iter, self.until or self.trainer.max_iter)
        if done >= last:
            return None
        start_done, start_used = self._start
        if done - start_done < self.min_iterations:
            return None
        speed = (used - start_used) / (done - start_done)
        remaining = self.trainer.max_iter - done
        predicted = used + remaining * speed
        if abs(predicted - self.budget_seconds) <= self.tolerance * self.budget_seconds:
            return None
        fits = done + int(max(0.0, self.budget_seconds - used) / speed)
        iterations = max(fits, math.ceil(done * 4 / 3), done + 1, self.min_length)
        if iterations == self.trainer.max_iter:
            return None
        return [float(iterations), speed, used]
