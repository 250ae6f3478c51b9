"""Joining a dataset to a store by index: batches of (inputs, labels, teacher targets).

* :mod:`~softlabels.data.provenance` -- is the store dumped from this dataset (one error naming
  every difference);
* :mod:`~softlabels.data.dataset` -- :class:`DistillDataset`, one (dataset, store) pair read a
  whole batch at a time; :mod:`~softlabels.data.concat` -- several pairs as one;
* :mod:`~softlabels.data.views` -- which stored view a row reads per epoch;
* :mod:`~softlabels.data.sampler` -- :class:`StoreBatchSampler` (rank shards, chunk-aware
  shuffling) and :func:`make_loader`.
"""

from softlabels.data.concat import ConcatDistillDataset
from softlabels.data.dataset import DEFAULT_PRELOAD_BYTES, DistillDataset
from softlabels.data.provenance import (
    StoreDatasetMismatchError,
    StoreDifference,
    check_store_matches,
    dataset_differences,
    store_dataset_metadata,
)
from softlabels.data.sampler import StoreBatchSampler, collate_batch, make_loader
from softlabels.data.views import VIEW_MODES, BatchIndices

__all__ = [
    "StoreDatasetMismatchError",
    "VIEW_MODES",
    "DEFAULT_PRELOAD_BYTES",
    "store_dataset_metadata",
    "StoreDifference",
    "dataset_differences",
    "check_store_matches",
    "DistillDataset",
    "ConcatDistillDataset",
    "StoreBatchSampler",
    "BatchIndices",
    "collate_batch",
    "make_loader",
]
