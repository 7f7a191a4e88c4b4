"""Dataset-wide passes in multi-process runs: built once by the main process, errors on all ranks;
and the few numbers the training hooks share every iteration.

Pixel statistics, the low-resolution cache and AlignDet's pseudo-boxes are each computed once
into a content-keyed cache. :func:`build_on_main` runs such a pass on the main process while the
others wait; if it fails there, every process raises (no rank is left waiting in a barrier until
the NCCL timeout), and otherwise the other processes run it too, which then reads the cache.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["MainProcessError", "all_reduce_floats", "build_on_main"]

T = TypeVar("T")


class MainProcessError(RuntimeError):
    """A dataset-wide pass failed on the main process; raised on the other processes."""


def build_on_main(fn: Callable[[], T], what: str, others_too: bool = True) -> T:
    """Run ``fn`` on the main process first, then on the others (which read its cache).

    Args:
        fn: the pass; it must be cheap the second time (cached by content).
        what: a few words naming the pass, for the error raised on the other processes.
        others_too: False runs ``fn`` on the main process only (the others return None).

    Returns:
        ``fn()`` on every process (with ``others_too``).

    Raises:
        Whatever ``fn`` raised, on the main process; :class:`MainProcessError` with that
        message on the other processes.
    """
    if comm.get_world_size() == 1:
        return fn()
    error, result = None, None
    if comm.is_main_process():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling every rank
            error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = comm.all_gather(message)  # every rank waits here for the main process
    if error is not None:
        raise error
    if messages[0] is not None:
        raise MainProcessError(f"{what} failed on the main process: {messages[0]}")
    if comm.is_main_process() or not others_too:
        return result
    return fn()


def all_reduce_floats(values: list[float], model: torch.nn.Module, op: str = "sum") -> list[float]:
    """``values`` reduced over all processes (``op`` "sum" or "max"), on ``model``'s device
    (collective); unchanged with one process."""
    if comm.get_world_size() == 1:
        return list(values)
    device = next(model.parameters()).device
    shared = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(shared, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return shared.tolist()
