"""Is this store dumped from this dataset? The store-to-dataset identity check.

:func:`check_store_matches` compares the store's recorded dataset identity (sample count,
labels fingerprint, classes, spec, split, input shape, preprocessing, input hash) with the
dataset at hand and raises one :class:`StoreDatasetMismatchError` naming every difference with
the store's value and this run's value, by kind (:mod:`softlabels.datasets.identity`).
``allow_mismatch`` (kinds, or True for all) turns those differences into warnings; a different
sample or class count is never allowed (rows would not line up / the student's output layer
would not fit).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.datasets.identity import KINDS, identity_differences, parse_allow
from softlabels.errors import SchemaMismatchError
from softlabels.stores.metadata import labels_fingerprint
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
    if isinstance(targets, (list, tuple, np.ndarray)):  # torchvision ImageFolder, CIFAR, ...
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if isinstance(targets, torch.Tensor):
        labels = targets.numpy().astype(np.int64)
        return None if bool((labels < 0).all()) else labels
    return _UNKNOWN if targets is None else None


_UNKNOWN = np.empty(0, dtype=np.int64)  # a dataset without .targets and without an info: labels not compared


def json_value(value: Any) -> Any:
    """Normalise to what a JSON round trip gives (tuples -> lists), for comparing with metadata."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def store_dataset_metadata(info: Any) -> dict[str, Any]:
    """The ``schema.dataset`` dict a store records for a dataset split (:class:`DatasetInfo`),
    as ``softlabels dump`` writes it: ``info.to_dict()`` (spec, split, num_samples, num_classes,
    input_shape, preprocessing, content_sha256) plus ``labels_sha256``."""
    return {**info.to_dict(), "labels_sha256": None if info.labels is None else labels_fingerprint(info.labels)}


@dataclass(frozen=True)
class StoreDifference:
    """One recorded dataset property that differs from the dataset at hand, with its ``kind``
    (:data:`softlabels.datasets.identity.KINDS`: what ``--allow KIND`` lets through). ``hard``
    differences (sample or class count) cannot be overridden: rows or targets would not fit."""

    field: str
    store_value: Any
    run_value: Any
    hard: bool = False
    note: str = ""
    kind: str = ""

    def describe(self) -> str:
        if self.store_value is None and self.run_value is None and self.note:
            return self.note  # a manifest difference says it all, e.g. "class folders renamed: ..."
        text = f"{self.field} {_shown(self.store_value)} in the store, {_shown(self.run_value)} here"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "kind": self.kind, "store_value": json_value(self.store_value),
                "run_value": json_value(self.run_value), **({"note": self.note} if self.note else {})}


def _shown(value: Any) -> str:
    """Values as they read in a message: sha256 digests shortened to 12 hex digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return repr(value)


def dataset_differences(store: SoftLabelStore, dataset: Any, info: Any | None = None) -> list[StoreDifference]:
    """Every way ``dataset`` (described by ``info``, a DatasetInfo) differs from the dataset
    ``store`` records: sample and class count (hard), then by kind (``identity_differences``):
    spec, split, input shape, preprocessing, files and classes (the manifest of a file dataset,
    or the inputs fingerprint), and the labels fingerprint. The local root of a path dataset is
    not compared. Fields the store did not record are not compared; contents only when the
    sample counts agree."""
    recorded = dict(store.schema.dataset)
    n_here = int(info.num_samples) if info is not None else len(dataset)
    out: list[StoreDifference] = []
    if n_here != store.num_samples:
        out.append(StoreDifference("num_samples", store.num_samples, n_here, hard=True, kind="size"))
    if info is not None and int(info.num_classes) != store.num_classes:
        out.append(StoreDifference("num_classes", store.num_classes, int(info.num_classes), hard=True, kind="size"))
    same_rows = n_here == store.num_samples
    contents: list[StoreDifference] = []  # reported after the labels
    if info is not None:
        here = json_value(info.to_dict())
        for field, a, b, kind, note in identity_differences(json_value(recorded), here, same_rows=same_rows):
            (contents if kind in ("files", "classes") else out).append(StoreDifference(field, a, b, note=note, kind=kind))
    stored_fp = recorded.get("labels_sha256")
    if stored_fp is not None and same_rows:
        labels = _labels_of(dataset, info)
        if labels is _UNKNOWN:
            pass
        elif labels is None:
            out.append(StoreDifference("labels_sha256", stored_fp, None, note="this dataset is unlabeled", kind="labels"))
        elif (here_fp := labels_fingerprint(labels)) != stored_fp:
            out.append(StoreDifference("labels_sha256", stored_fp, here_fp, note="labels differ in value or order",
                                       kind="labels"))
    return out + contents


def allowed_kinds(allow: bool | Iterable[str] | None) -> frozenset[str]:
    """``True``: every kind; ``False``/``None``: none; else the kinds named (``--allow KIND``)."""
    if allow is True:
        return frozenset(KINDS)
    if not allow:
        return frozenset()
    return parse_allow([allow] if isinstance(allow, str) else allow)


def allow_flags(kinds: Iterable[str]) -> str:
    """``{"files", "classes"}`` -> ``"--allow files --allow classes"`` (in :data:`KINDS` order)."""
    return " ".join(f"--allow {kind}" for kind in KINDS if kind in set(kinds))


def check_store_matches(
    store: SoftLabelStore, dataset: Any, info: Any | None = None, *, allow_mismatch: bool | Iterable[str] = False
) -> list[str]:
    """Check that ``store`` was dumped from ``dataset`` (described by ``info``, a DatasetInfo).

    Raises :class:`StoreDatasetMismatchError` naming every difference as "<field> <store
    value> in the store, <this run's value> here" and the ``--allow KIND`` flags that would let
    them through. ``allow_mismatch``: the kinds of difference to allow (``True``: all); allowed
    differences come back as one warning for the caller to print (and
    :func:`dataset_differences` gives them as records). A different sample or class count
    always raises.
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
    allowed = allowed_kinds(allow_mismatch)
    blocked = {d.kind for d in diffs if d.kind not in allowed}
    if blocked:
        raise StoreDatasetMismatchError(
            f"{head}; train on the dataset the store was dumped from, or pass {allow_flags(blocked)} to train anyway"
        )
    kinds = [kind for kind in KINDS if kind in {d.kind for d in diffs}]
    return [f"{head}; training anyway (--allow {', '.join(kinds)})"]
