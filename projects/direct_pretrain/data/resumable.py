"""A training loader that can start at any iteration and then yields what a loader started at
iteration 0 yields from there on (for an exact resume).

Detectron2's loader restarts its sampler's stream on resume, and the augmentations draw from
the global random generators of whichever process maps a sample. Here the stream is skipped to
the resumed position, and each sample is mapped with the global generators seeded from (seed,
process rank, its position in this process's stream): its augmentation does not depend on the
loader worker that maps it nor on what ran before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

from detectron2.data import build_detection_train_loader
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import IterableDataset, Sampler, get_worker_info

from ..utils.rng import derived_seed, rng_kept

__all__ = ["ResumableStream", "resumable_train_loader"]


class ResumableStream(IterableDataset):
    """This process's share of ``sampler``'s infinite stream from ``start`` on, each sample
    mapped by ``mapper`` with seeded global random generators.

    Loader workers take turns of ``turn`` consecutive positions, as a ``DataLoader`` collects
    them (1 when it fetches single samples, the batch size when it batches), so that the
    samples reach the trainer in stream order whatever the number of workers.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        mapper: Callable[[dict], dict],
        sampler: Sampler,
        *,
        seed: int,
        start: int,
        turn: int,
    ) -> None:
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.seed, self.start, self.turn = seed, start, turn
        self.rank = comm.get_rank()  # in the main process: workers have no process group

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for offset, index in enumerate(itertools.islice(self.sampler, self.start, None)):
            if (offset // self.turn) % workers == worker:
                seed_all_rng(derived_seed(self.seed, self.rank, self.start + offset))
                yield self.mapper(self.dataset[index])


class _RngKeptLoader:
    """``loader``'s batches, fetched with this process's random states kept: starting its
    iterator (torch draws the workers' base seed) and mapping in this process (no workers)
    leave the training's random draws as they were."""

    def __init__(self, loader: Iterable[list[dict]]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[dict]]:
        with rng_kept():
            batches = iter(self.loader)
        while True:
            with rng_kept():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def resumable_train_loader(
    dataset: Sequence[dict],
    mapper: Callable[[dict], dict],
    sampler: Sampler,
    *,
    seed: int,
    start_iter: int,
    total_batch_size: int,
    aspect_ratio_grouping: bool,
    num_workers: int,
) -> Iterable[list[dict]]:
    """Detectron2's ``build_detection_train_loader`` on a :class:`ResumableStream`: its first
    batch is the one a loader started at iteration 0 gives at ``start_iter``.

    Exact as long as every batch is ``total_batch_size / world size`` consecutive samples of
    the stream: always without ``aspect_ratio_grouping``; with it, when all training images
    fall in one of Detectron2's two aspect groups (width > height, or not), by their dataset
    ``width`` and ``height`` (crops do not change the group).
    """
    batch_size = total_batch_size // comm.get_world_size()
    stream = ResumableStream(
        dataset,
        mapper,
        sampler,
        seed=seed,
        start=start_iter * batch_size,
        turn=1 if aspect_ratio_grouping else batch_size,
    )
    loader = build_detection_train_loader(
        stream,
        mapper=None,
        total_batch_size=total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
    )
    return _RngKeptLoader(loader)
