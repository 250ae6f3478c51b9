"""Batches of indices for one rank (chunk-aware shuffling), and the DataLoader around them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from softlabels.data.views import BatchIndices
from softlabels.errors import SpecError

if TYPE_CHECKING:  # annotations only: the dataset modules do not import the sampler
    from softlabels.data.concat import ConcatDistillDataset
    from softlabels.data.dataset import DistillDataset


class StoreBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank, reshuffled every epoch (:meth:`set_epoch`).

    ``shuffle``: ``False`` (dataset order), ``True`` (a full permutation) or ``"chunks"``
    (chunk-aware: the store's read chunks in random order, rows shuffled within windows of
    ``window_chunks`` consecutive chunks of that order -- each chunk is decoded about once per
    epoch, so stores larger than memory stream at disk speed). Every rank computes the same
    epoch order from ``seed`` and takes its shard: a contiguous block in chunk mode (so a rank
    reads its own chunks), every ``world_size``-th index otherwise (``DistributedSampler``'s rule:
    then step ``i`` of all ranks together is batch ``i`` of one process at ``world_size x
    batch_size`` over the same order, which makes DDP's averaged step the single-process step). Like
    ``DistributedSampler``, the order is padded by repeating its start so that every rank gets
    the same number of samples (``pad=False`` truncates instead). Rows in ``exclude`` are never
    yielded (a ``--holdout`` part of train). Yields :class:`BatchIndices`.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool | str = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        window_chunks: int = 4,
        pad: bool = True,
        exclude: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise SpecError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SpecError(f"rank {rank} is outside 0..{world_size - 1}")
        if shuffle not in (True, False, "chunks"):
            raise SpecError(f"shuffle must be True, False or 'chunks', got {shuffle!r}")
        self.num_samples = data if isinstance(data, int) else len(data)
        self.keep = None  # rows left out of every epoch (``exclude``: e.g. a held-out part of train)
        if exclude is not None and len(exclude):
            self.keep = np.ones(self.num_samples, dtype=bool)
            self.keep[np.asarray(exclude, dtype=np.int64)] = False
        self.bounds = None
        if shuffle == "chunks":
            bounds = getattr(data, "chunk_bounds", None)
            if bounds is None:
                raise SpecError("shuffle='chunks' needs a DistillDataset (it knows the store's chunks)")
            self.bounds = np.asarray(bounds(), dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.window_chunks = max(1, int(window_chunks))
        self.pad = bool(pad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle is True:
            return rng.permutation(n).astype(np.int64)
        starts, stops = self.bounds[:-1], self.bounds[1:]
        chunk_order = rng.permutation(len(starts))
        pieces = []
        for w in range(0, len(chunk_order), self.window_chunks):
            window = chunk_order[w : w + self.window_chunks]
            rows = np.concatenate([np.arange(starts[c], stops[c], dtype=np.int64) for c in window])
            pieces.append(rows[rng.permutation(rows.size)])
        return np.concatenate(pieces) if pieces else np.arange(0, dtype=np.int64)

    def _shard(self) -> np.ndarray:
        order = self._order()
        if self.keep is not None:
            order = order[self.keep[order]]
        w = self.world_size
        if w == 1:
            return order
        if self.pad:
            per_rank = -(-order.size // w)
            extra = per_rank * w - order.size
            if extra:
                order = np.concatenate([order, np.resize(order, extra)])
        else:
            per_rank = order.size // w
            order = order[: per_rank * w]
        if self.shuffle == "chunks":
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order[self.rank :: w]

    def __iter__(self) -> Iterator[BatchIndices]:
        shard = self._shard()
        b = self.batch_size
        stop = (shard.size // b) * b if self.drop_last else shard.size
        for start in range(0, stop, b):
            yield BatchIndices(shard[start : start + b].tolist(), self.epoch)

    def _per_rank(self) -> int:
        n = self.num_samples if self.keep is None else int(self.keep.sum())
        w = self.world_size
        return -(-n // w) if self.pad else n // w

    def __len__(self) -> int:
        m = self._per_rank()
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)


def collate_batch(batch: Any) -> Any:
    """``collate_fn`` for a DataLoader over a DistillDataset: the batch is already collated."""
    return batch


def make_loader(
    data: DistillDataset | ConcatDistillDataset,
    sampler: StoreBatchSampler,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader that calls ``data.__getitems__`` once per batch of ``sampler`` (in worker
    processes when ``num_workers > 0``)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_batch,
        pin_memory=pin_memory,
        **kwargs,
    )
