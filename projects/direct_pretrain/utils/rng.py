"""Random states that depend only on a seed and a position, so that a resumed run draws what
an uninterrupted one draws."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derived_seed", "rng_kept"]


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends only on the non-negative ``keys`` (e.g. a base seed, the
    process rank and a position)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's CPU random states on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
