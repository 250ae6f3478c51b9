"""Store targets in your own training loop (timm, Lightning, a plain PyTorch loop).

Three pieces, documented with a runnable example in docs/TRAINING.md::

    method = build_method("kd", "teacher.zarr", temperature=4)      # the loss module
    data = StoreTargets(my_dataset, "teacher.zarr", method)         # item i: (x_i, y_i, targets_i)
    for x, y, targets in DataLoader(data, batch_size=64, shuffle=True, num_workers=2):
        loss = method(model(x), y, targets).total

:class:`StoreTargets` joins any map-style dataset (item ``i -> (x, y)``, e.g. a torchvision
``ImageFolder`` with your own training transforms) to the store row ``i`` dumped from that
sample. A DataLoader batch reads the store once (``__getitems__``), in the worker processes when
``num_workers > 0``; the targets are the method's loss-ready rows. Several (dataset, store)
pairs -- a labelled train split and an unlabeled transfer split -- concatenate into one index space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from softlabels.data import DEFAULT_PRELOAD_BYTES, ConcatDistillDataset, DistillDataset
from softlabels.losses import DistillationMethod
from softlabels.losses import build_method as _build_method
from softlabels.fields import FEATURES_PREFIX
from softlabels.stores.reader import SoftLabelStore, open_store

__all__ = ["StoreTargets", "build_method"]


def _open(store: SoftLabelStore | str) -> SoftLabelStore:
    return store if isinstance(store, SoftLabelStore) else open_store(str(store))


def build_method(name: str, store: SoftLabelStore | str | None = None, **hparams: Any) -> DistillationMethod:
    """The loss module ``name`` (``kd``, ``kd-topk``, ``kd-sim``, ... see docs/LOSSES.md) with the
    constants it needs read from ``store``: the number of classes, the teacher's classifier and
    the feature width. ``hparams`` are the method's (e.g. ``temperature=4``, ``ce_weight=0.1``)."""
    if store is None:
        return _build_method(name, **hparams)
    store = _open(store)
    constants: dict[str, Any] = {"num_classes": store.num_classes}
    if store.schema.classifier_dim is not None:
        constants["classifier_weight"] = torch.as_tensor(store.classifier()[0])
    feature = str(hparams.get("feature", "penultimate")).removeprefix(FEATURES_PREFIX)
    dims = dict(store.schema.features)
    if feature in dims:
        constants["teacher_feature_shape"] = (dims[feature],)
    return _build_method(name, **hparams, **constants)


class StoreTargets(torch.utils.data.Dataset):
    """``dataset`` joined row by row to ``store`` for ``method``: item ``i`` is
    ``(x, y, {field: tensor})`` with ``y = -1`` for unlabeled samples.

    ``dataset`` and ``store`` may be sequences of equal length (one store per split). The store
    must have been dumped from this dataset in this order: the sample count must match, and when
    the dataset has ``.targets`` (torchvision datasets do) their fingerprint must equal the
    store's (else :class:`~softlabels.data.StoreDatasetMismatchError`).
    Arrays up to ``preload_bytes`` are held in memory; larger ones are read per batch.
    """

    def __init__(
        self,
        dataset: Any | Sequence[Any],
        store: SoftLabelStore | str | Sequence[SoftLabelStore | str],
        method: DistillationMethod,
        *,
        k: int | None = None,
        preload_bytes: int = DEFAULT_PRELOAD_BYTES,
    ) -> None:
        many = isinstance(store, (list, tuple))
        datasets = list(dataset) if many else [dataset]
        stores = [_open(s) for s in (store if many else [store])]
        if len(datasets) != len(stores):
            raise ValueError(f"{len(datasets)} datasets but {len(stores)} stores; pair each dataset with its store")
        parts = [
            DistillDataset.for_method(data, st, method, k=k, preload_bytes=preload_bytes)
            for data, st in zip(datasets, stores)
        ]
        self.data = parts[0] if len(parts) == 1 else ConcatDistillDataset(parts)
        self.warnings = list(self.data.warnings)

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, dict[str, torch.Tensor]]]:
        """One store read for the whole batch, returned as items for the DataLoader's collate."""
        batch = self.data.__getitems__(list(indices))
        targets = batch["targets"]
        return [
            (batch["input"][r], int(batch["label"][r]), {name: t[r] for name, t in targets.items()})
            for r in range(batch["input"].shape[0])
        ]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        return self.__getitems__([int(i)])[0]

    def set_epoch(self, epoch: int) -> None:
        """For stores with several views (``--views next|random`` semantics): the epoch to read."""
        self.data.set_epoch(epoch)
