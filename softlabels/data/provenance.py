"""Is this store dumped from this dataset? The store-to-dataset identity check.

:func:`check_store_matches` compares the store's recorded dataset identity (sample count,
labels fingerprint, classes, spec, split, input shape, preprocessing, input hash) with the
dataset at hand and raises one :class:`StoreDatasetMismatchError` naming every difference with
the store's value and this run's value. ``allow_mismatch=True`` turns the soft differences into
warnings; a different sample or class count is never allowed (rows would not line up / the
student's output layer would not fit).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.errors import SchemaMismatchError
from softlabels.stores import format as fmt
from softlabels.stores.reader import SoftLabelStore


class StoreDatasetMismatchError(SchemaMismatchError):
    """The store was dumped from other data than the dataset it is being joined with."""


# --------------------------------------------------------------------------------------
# Identity checks
# --------------------------------------------------------------------------------------
def _labels_of(dataset: Any, info: Any | None) -> np.ndarray | None:
    """Labels ``[N]`` int64 of a dataset (None if unlabeled): ``info.labels``, else ``.targets``."""
    if info is not None:
        return None if info.labels is None else np.asarray(info.labels, dtype=np.int64)
    targets = getattr(dataset, "targets", None)
    if isinstance(targets, torch.Tensor):
        labels = targets.numpy().astype(np.int64)
        return None if bool((labels < 0).all()) else labels
    return None


def json_value(value: Any) -> Any:
    """Normalise to what a JSON round trip gives (tuples -> lists), for comparing with metadata."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def store_dataset_metadata(info: Any) -> dict[str, Any]:
    """The ``schema.dataset`` dict a store records for a dataset split (:class:`DatasetInfo`),
    as ``softlabels dump`` writes it: ``info.to_dict()`` (spec, split, num_samples, num_classes,
    input_shape, preprocessing, content_sha256) plus ``labels_sha256``."""
    return {**info.to_dict(), "labels_sha256": None if info.labels is None else fmt.labels_fingerprint(info.labels)}


@dataclass(frozen=True)
class StoreDifference:
    """One recorded dataset property that differs from the dataset at hand. ``hard``
    differences (sample or class count) cannot be overridden: rows or targets would not fit."""

    field: str
    store_value: Any
    run_value: Any
    hard: bool = False
    note: str = ""

    def describe(self) -> str:
        text = f"{self.field} {_shown(self.store_value)} in the store, {_shown(self.run_value)} here"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "store_value": json_value(self.store_value), "run_value": json_value(self.run_value)}


def _shown(value: Any) -> str:
    """Values as they read in a message: sha256 digests shortened to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return repr(value)


def _leaf_differences(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    """``[("preprocessing.normalize.mean", 0.1, 0.2), ...]``: every differing leaf of two JSON trees."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _leaf_differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [(path, a, b)]


def dataset_differences(store: SoftLabelStore, dataset: Any, info: Any | None = None) -> list[StoreDifference]:
    """Every way ``dataset`` (described by ``info``, a DatasetInfo) differs from the dataset
    ``store`` records: sample and class count (hard), spec, split, input shape,
    preprocessing, labels fingerprint, inputs fingerprint. Fields the store did not record
    are not compared; fingerprints only when the sample counts agree."""
    recorded = dict(store.schema.dataset)
    n_here = int(info.num_samples) if info is not None else len(dataset)
    out: list[StoreDifference] = []
    if n_here != store.num_samples:
        out.append(StoreDifference("num_samples", store.num_samples, n_here, hard=True))
    if info is not None and int(info.num_classes) != store.num_classes:
        out.append(StoreDifference("num_classes", store.num_classes, int(info.num_classes), hard=True))
    if info is not None:
        for key, here in (("spec", info.spec), ("split", info.split), ("input_shape", json_value(list(info.input_shape)))):
            if recorded.get(key) is not None and recorded[key] != here:
                out.append(StoreDifference(key, recorded[key], here))
        if recorded.get("preprocessing") is not None:
            pre = _leaf_differences(json_value(recorded["preprocessing"]), json_value(info.preprocessing), "preprocessing")
            out += [StoreDifference(path, a, b) for path, a, b in pre]
    same_rows = n_here == store.num_samples
    stored_fp = recorded.get("labels_sha256")
    if stored_fp is not None and same_rows:
        labels = _labels_of(dataset, info)
        if labels is None:
            out.append(StoreDifference("labels_sha256", stored_fp, None, note="this dataset is unlabeled"))
        elif (here_fp := fmt.labels_fingerprint(labels)) != stored_fp:
            out.append(StoreDifference("labels_sha256", stored_fp, here_fp, note="labels differ in value or order"))
    if info is not None and same_rows:
        content = recorded.get("content_sha256")
        if content is not None and info.content_sha256 is not None and content != info.content_sha256:
            out.append(StoreDifference("content_sha256", content, info.content_sha256, note="inputs differ"))
    return out


def check_store_matches(
    store: SoftLabelStore, dataset: Any, info: Any | None = None, *, allow_mismatch: bool = False
) -> list[str]:
    """Check that ``store`` was dumped from ``dataset`` (described by ``info``, a DatasetInfo).

    Raises :class:`StoreDatasetMismatchError` naming every difference as "<field> <store
    value> in the store, <this run's value> here". With ``allow_mismatch`` only a different
    sample or class count raises; the other differences come back as one warning for the
    caller to print (and :func:`dataset_differences` gives them as records).
    """
    diffs = dataset_differences(store, dataset, info)
    if not diffs:
        return []
    head = f"store {store.location} does not match this run's dataset: " + "; ".join(d.describe() for d in diffs)
    if any(d.hard for d in diffs):
        raise StoreDatasetMismatchError(
            f"{head}; a different sample or class count cannot be overridden (store rows or targets would not "
            "fit); train on the dataset the store was dumped from, or re-dump the store for this one"
        )
    if not allow_mismatch:
        raise StoreDatasetMismatchError(
            f"{head}; train on the dataset the store was dumped from, or pass --allow-mismatch to train anyway"
        )
    return [f"{head}; training anyway (--allow-mismatch)"]
