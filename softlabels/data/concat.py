"""Several (dataset, store) pairs -- a labelled train split and an unlabeled transfer split -- as one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from softlabels.data.dataset import DistillDataset, _unbatch
from softlabels.data.views import BatchIndices
from softlabels.errors import SpecError


class ConcatDistillDataset(torch.utils.data.Dataset):
    """Several :class:`DistillDataset` parts as one index space ``[0, sum N)``, in order.

    Every part must deliver the same target fields with the same per-row shapes (e.g. equal k
    after slicing). A batch mixing parts is assembled from one read per part.
    """

    def __init__(self, parts: Sequence[DistillDataset]) -> None:
        if not parts:
            raise SpecError("ConcatDistillDataset needs at least one part")
        self.parts = list(parts)
        fields = {p.fields for p in self.parts}
        if len(fields) != 1:
            raise SpecError(f"all parts must deliver the same fields, got {sorted(fields)}")
        self.fields = self.parts[0].fields
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.num_samples = int(self.offsets[-1])
        self.warnings = [w for p in self.parts for w in p.warnings]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def preloaded_all(self) -> bool:
        return all(p.preloaded_all for p in self.parts)

    def chunk_bounds(self) -> np.ndarray:
        bounds = [p.chunk_bounds()[:-1] + off for p, off in zip(self.parts, self.offsets[:-1])]
        return np.append(np.concatenate(bounds), self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        epoch = getattr(indices, "epoch", None)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_samples):
            raise IndexError(f"indices must lie in 0..{self.num_samples - 1}")
        which = np.searchsorted(self.offsets, index, side="right") - 1
        pieces, positions = [], []
        for part_id in np.unique(which):
            rows = np.flatnonzero(which == part_id)
            local = index[rows] - self.offsets[part_id]
            part = self.parts[int(part_id)]
            sub = BatchIndices(local.tolist(), part.epoch if epoch is None else epoch)
            pieces.append(part.__getitems__(sub))
            positions.append(rows)
        if len(pieces) == 1:
            batch = pieces[0]
            batch["index"] = torch.from_numpy(index)
            return batch
        inverse = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(tensors)[inverse]

        return {
            "index": torch.from_numpy(index),
            "input": cat([p["input"] for p in pieces]),
            "label": cat([p["label"] for p in pieces]),
            "view": cat([p["view"] for p in pieces]),
            "targets": {name: cat([p["targets"][name] for p in pieces]) for name in _same_keys(pieces)},
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _unbatch(self.__getitems__([int(i)]))


def _same_keys(pieces: list[dict[str, Any]]) -> list[str]:
    """The target names every part delivered (prepared or raw: all parts must agree)."""
    names = [sorted(p["targets"]) for p in pieces]
    if any(n != names[0] for n in names[1:]):
        raise SpecError(f"the parts delivered different target fields ({names}); build every part the same way")
    return names[0]
