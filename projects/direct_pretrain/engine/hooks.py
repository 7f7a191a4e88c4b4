"""Hooks every phase trainer shares: the phase timer, the phase kind's and the phase's own
hooks, and a check that every process's loss is finite."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..modeling.norm_eval import BackboneNormEval
from ..phases import Phase
from ..utils.rng import derived_seed

__all__ = ["AllRanksFinite", "PhaseTimer", "SeededIterations", "phase_hooks", "run_seed"]


def run_seed(seed: int) -> int:
    """``seed``, or where it is negative a random one shared by all processes (collective)."""
    return seed if seed >= 0 else comm.shared_random_seed()


class SeededIterations(HookBase):
    """Seeds this process's Python, NumPy and torch (CPU, GPUs) random generators before each
    iteration from (``seed``, process rank, iteration): the iteration's random draws (RPN and
    RoI sampling, drop-path) are then the same in a resumed phase as in an uninterrupted one,
    whatever ran before it (the resume, an evaluation, PreciseBN). Register it first."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rank = comm.get_rank()

    def before_step(self) -> None:
        seed_all_rng(derived_seed(self.seed, self.rank, self.trainer.iter))


class PhaseTimer(HookBase):
    """A phase's wall-clock and CPU seconds (this process, all its threads; data-loader
    workers not included) and its evaluations along the way: their results, iteration and
    the training time before them, their own time kept apart. Saved in checkpoints, so a
    resumed phase adds up (its training time excludes the evaluations before the resume)."""

    def __init__(self) -> None:
        self.seconds_before = 0.0
        self.cpu_seconds_before = 0.0
        self.eval_seconds = 0.0
        self.eval_cpu_seconds = 0.0
        self.history: list[dict] = []
        self._start = None
        self._cpu_start = None

    def before_train(self) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.seconds_before + running

    @property
    def cpu_seconds(self) -> float:
        running = time.process_time() - self._cpu_start if self._cpu_start is not None else 0.0
        return self.cpu_seconds_before + running

    def evaluate(self, run: Callable[[], dict], iteration: int) -> dict:
        """``run()``'s results, timed apart from training and appended (box AP, AP50) to
        ``history`` with the ``iteration``s done and the training time so far."""
        start, cpu_start = time.perf_counter(), time.process_time()
        results = run()
        self.eval_seconds += time.perf_counter() - start
        self.eval_cpu_seconds += time.process_time() - cpu_start
        bbox = results.get("bbox", {})
        self.history.append(
            {
                "iteration": iteration,
                "train_seconds": round(self.seconds - self.eval_seconds, 1),
                "train_cpu_seconds": round(self.cpu_seconds - self.eval_cpu_seconds, 1),
                **{k: bbox[k] for k in ("AP", "AP50") if k in bbox},
            }
        )
        return results

    def state_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_cpu_seconds": self.eval_cpu_seconds,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state["seconds"])
        # Older checkpoints have no CPU time nor evaluations.
        self.cpu_seconds_before = float(state.get("cpu_seconds", 0.0))
        self.eval_seconds = float(state.get("eval_seconds", 0.0))
        self.eval_cpu_seconds = float(state.get("eval_cpu_seconds", 0.0))
        self.history = list(state.get("history", []))


class AllRanksFinite(HookBase):
    """Stops every process at the same iteration when any process's forward pass fails or
    gives a non-finite loss.

    Detectron2 checks the loss on the main process only, after the backward pass, and its
    models raise inside the forward pass on Inf/NaN boxes: either way the other processes
    would wait in the next collective until the timeout. Right after each forward pass this
    hook shares one flag per process (one all-reduce of ``world_size`` numbers per
    iteration); a process whose forward pass raised joins that all-reduce on its way out
    (``after_train``), so the others raise too, naming the process(es).
    """

    NON_FINITE, RAISED = 1.0, 2.0

    def before_train(self) -> None:
        model = self.trainer.model
        self._in_forward = False
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._check),
        ]

    def after_train(self) -> None:
        if self._in_forward and comm.get_world_size() > 1:  # this process's forward raised
            self._share(self.RAISED, self._device)
        for handle in self._handles:
            handle.remove()

    def _enter(self, module, inputs) -> None:
        self._in_forward = module.training
        self._device = next(module.parameters()).device

    def _share(self, flag: float, device) -> torch.Tensor:
        flags = torch.zeros(comm.get_world_size(), device=device)
        flags[comm.get_rank()] = flag
        if comm.get_world_size() > 1:
            dist.all_reduce(flags)
        return flags

    def _check(self, module, inputs, outputs) -> None:
        if not self._in_forward:
            return
        self._in_forward = False
        losses = [v for v in outputs.values() if isinstance(v, torch.Tensor)]
        finite = all(bool(torch.isfinite(v).all()) for v in losses)
        flags = self._share(0.0 if finite else self.NON_FINITE, self._device).tolist()
        if any(flags):
            problems = []
            bad = [r for r, f in enumerate(flags) if f == self.NON_FINITE]
            raised = [r for r, f in enumerate(flags) if f == self.RAISED]
            if bad:
                problems.append(f"loss became infinite or NaN on process(es) {bad}")
            if raised:
                problems.append(f"the forward pass raised on process(es) {raised} (see there)")
            mine = {k: float(v.detach().float().mean()) for k, v in outputs.items()}
            raise FloatingPointError(
                f"Training diverged at iteration={self.trainer.iter}: {'; '.join(problems)}; "
                f"this process's losses: {mine}"
            )


def phase_hooks(cfg, phase: Phase) -> list[HookBase]:
    """The hooks a phase adds to Detectron2's: its kind's (e.g. AlignDet's EMA target), the
    backbone norm-eval of ``BACKBONE_NORM_EVAL`` and the all-process loss check."""
    extra = [*phase.KIND.hooks(cfg), AllRanksFinite()]
    if phase.BACKBONE_NORM_EVAL:
        extra.append(BackboneNormEval())
    return extra
