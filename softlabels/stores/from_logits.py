"""Build a store in-process from dense teacher logits you already have (e.g. computed
elsewhere, or in tests and benchmarks). The Ray dump writes the same arrays unit by unit."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from softlabels.stores import format as fmt
from softlabels.stores.metadata import labels_fingerprint
from softlabels.stores.writer import StoreWriter
from softlabels.targets import summarize_logits


def write_store_from_logits(
    location: str | os.PathLike,
    logits: np.ndarray | torch.Tensor,
    *,
    k: int,
    temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    labels: np.ndarray | None = None,
    features: Mapping[str, np.ndarray] | None = None,
    classifier_weight: np.ndarray | None = None,
    classifier_bias: np.ndarray | None = None,
    value_dtype: str = "float16",
    teacher: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    rows_per_shard: int = 0,
    rows_per_chunk: int = 0,
    overwrite: bool = False,
    augmentation: Mapping[str, Any] | None = None,
    augment_params: Mapping[str, np.ndarray] | None = None,
    codec: str = "fp16",
) -> StoreWriter:
    """Write a complete store. ``logits`` is ``[N, C]`` or ``[N, V, C]``; ``features[name]`` is
    ``[N, D]`` or ``[N, V, D]``; ``labels`` is ``[N]`` (None for a transfer set).
    ``augmentation`` is the ``schema.augmentation`` record (e.g. a
    :meth:`softlabels.augment.Policy.metadata`) and ``augment_params[name]`` its ``[N, V, ...]``
    parameter arrays (docs/FORMAT.md section 7). ``codec``: "fp16" (``value_dtype`` floats) or
    "compact" (section 8)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    if z.ndim == 2:
        z = z.unsqueeze(1)
    n, v, c = z.shape
    feats = {name: _with_view(np.asarray(a), v) for name, a in (features or {}).items()}
    ds = dict(dataset or {})
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        ds.setdefault("labels_sha256", labels_fingerprint(labels))
    ds.setdefault("num_samples", n)
    schema = fmt.StoreSchema(
        num_samples=n,
        num_classes=c,
        k=k,
        temperatures=tuple(temperatures),
        views=v,
        labeled=labels is not None,
        value_dtype=value_dtype,
        features=tuple((name, a.shape[-1]) for name, a in feats.items()),
        classifier_dim=None if classifier_weight is None else int(np.shape(classifier_weight)[1]),
        classifier_bias=classifier_bias is not None,
        rows_per_shard=rows_per_shard,
        rows_per_chunk=rows_per_chunk,
        teacher=dict(teacher or {"spec": "logits"}),
        dataset=ds,
        augmentation=augmentation,
        codec=None if codec == "fp16" else {"name": codec},
    )
    writer = StoreWriter.create(
        location, schema, classifier_weight=classifier_weight, classifier_bias=classifier_bias, overwrite=overwrite
    )
    for unit in writer.pending_units():
        start, stop = schema.unit_range(unit)
        lab = None if labels is None else torch.as_tensor(labels[start:stop]).unsqueeze(1).expand(-1, v)
        fields = {name: t.numpy() for name, t in summarize_logits(z[start:stop], k, temperatures, lab).items()}
        if labels is not None:
            fields[fmt.LABELS] = labels[start:stop]
        for name, arr in feats.items():
            fields[fmt.FEATURES_PREFIX + name] = arr[start:stop]
        for name, arr in (augment_params or {}).items():
            fields[fmt.AUGMENT_PREFIX + name] = np.asarray(arr)[start:stop]
        writer.mark_complete(unit, writer.write_unit(unit, fields))
    writer.finalize()
    return writer


def _with_view(arr: np.ndarray, views: int) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.shape[1] != views:
        raise ValueError(f"feature array has {arr.shape[1]} views, logits have {views}")
    return arr
