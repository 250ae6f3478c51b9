"""What every dataset loader returns: the data (:class:`InMemoryDataset` or any torch Dataset)
and its identity (:class:`DatasetInfo`), which stores record so a student can later check that it
trains on exactly the inputs the teacher saw."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DatasetInfo", "InMemoryDataset", "inputs_sha256"]


@dataclass(frozen=True)
class DatasetInfo:
    """Identity and shape of one split of one dataset.

    ``spec`` is canonical (every parameter spelled out, defaults included), so equal specs mean
    equal data; ``split`` is kept separately. ``labels`` is ``None`` for unlabeled splits.
    """

    spec: str
    split: str
    num_samples: int
    num_classes: int
    input_shape: tuple[int, ...]
    labels: np.ndarray | None
    preprocessing: dict
    content_sha256: str | None
    manifest: dict | None = None  # file datasets: identity by content (softlabels.datasets.manifest)

    def to_dict(self) -> dict:
        """JSON-serialisable identity, without the labels array (stores keep labels as an array)."""
        extra = {} if self.manifest is None else {"manifest": self.manifest}
        return {**extra,
            "spec": self.spec,
            "split": self.split,
            "num_samples": int(self.num_samples),
            "num_classes": int(self.num_classes),
            "input_shape": [int(d) for d in self.input_shape],
            "preprocessing": self.preprocessing,
            "content_sha256": self.content_sha256,
        }

    # The generated dataclass __eq__/__hash__ would compare/hash the ndarray field and fail.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DatasetInfo):
            return NotImplemented
        if self.to_dict() != other.to_dict():
            return False
        if self.labels is None or other.labels is None:
            return self.labels is None and other.labels is None
        return bool(np.array_equal(self.labels, other.labels))

    def __hash__(self) -> int:
        return hash((self.spec, self.split, self.num_samples, self.content_sha256))


def in_memory(dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(inputs, targets)`` of a dataset held as two tensors (an :class:`InMemoryDataset` or
    alike), which callers index with a whole batch at once; None for any other dataset."""
    inputs, targets = getattr(dataset, "inputs", None), getattr(dataset, "targets", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        return inputs, targets
    return None


class InMemoryDataset(torch.utils.data.Dataset):
    """A split held as two tensors: ``inputs`` float32 ``[N, *input_shape]`` and ``targets``
    int64 ``[N]`` (``-1`` where unlabeled).

    Trainers can index ``inputs``/``targets`` with a batch of indices directly instead of
    calling ``__getitem__`` per sample; pickling sends the tensors, so it works in Ray and
    DataLoader worker processes.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if inputs.dtype != torch.float32:
            raise ValueError(f"inputs must be float32, got {inputs.dtype}")
        if targets.dtype != torch.int64 or targets.shape != inputs.shape[:1]:
            raise ValueError(f"targets must be int64 [{inputs.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.targets[index])

    def __repr__(self) -> str:
        return f"InMemoryDataset(inputs={tuple(self.inputs.shape)}, labeled={bool((self.targets >= 0).all())})"


def inputs_sha256(inputs: torch.Tensor) -> str:
    """sha256 of the float32, C-contiguous, little-endian bytes of the preprocessed inputs."""
    array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype="<f4")
    return hashlib.sha256(array.tobytes()).hexdigest()
