"""Which stored view a row reads in an epoch, and the batch of indices that carries its epoch."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from softlabels.splitmix import splitmix64

VIEW_MODES = ("first", "next", "random")


def _random_views(index: np.ndarray, views: int, seed: int, epoch: int) -> np.ndarray:
    """A view per row that depends only on (seed, epoch, sample index): identical whichever
    worker or rank reads the row."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))
        return (splitmix64(index.astype(np.uint64) ^ key) % np.uint64(views)).astype(np.int64)


class BatchIndices(list):
    """A list of sample indices that also carries the epoch it belongs to, so that per-epoch
    view selection is right in (persistent) DataLoader workers too."""

    epoch: int = 0

    def __init__(self, indices: Iterable[int], epoch: int = 0) -> None:
        super().__init__(indices)
        self.epoch = int(epoch)

    def __reduce__(self):
        return (BatchIndices, (list(self), self.epoch))
