"""Joining a dataset to a store by index: batches of (inputs, labels, teacher targets).

Row ``i`` of a store is sample ``i`` of the dataset it was dumped from, so a student batch is
"these indices of the dataset" plus "these rows of the store". This module makes that join
safe and fast:

* **Safe** -- :func:`check_store_matches` compares the store's recorded dataset identity
  (sample count, labels fingerprint, classes, spec, split, input shape, preprocessing, input
  hash) with the dataset at hand and raises one :class:`StoreDatasetMismatchError` naming every
  difference with the store's value and this run's value.
  ``allow_mismatch=True`` turns the soft differences (labels, spec, split, preprocessing,
  inputs) into warnings; a different sample or class count is never allowed (rows would not
  line up / the student's output layer would not fit).
* **Fast** -- targets are read for a *whole batch* at once, never per item: arrays small
  enough to preload (by default: when the requested arrays total at most 1 GiB) are held in
  memory already reduced to what a batch needs (the chosen temperature's ``logsumexp`` column,
  the first k, view 0), so a batch is one numpy row gather per field; everything else is one
  ``store.read`` call per batch (the reader groups rows by chunk). :class:`DistillDataset`
  implements ``__getitems__(indices)`` (the hook PyTorch's ``DataLoader`` calls with a batch of
  indices) and returns an already collated batch, so it works with a plain ``DataLoader`` (pass ``collate_fn=collate_batch``), with worker processes
  (everything pickles; each worker re-opens the store) and with ``DistributedSampler`` ranks.
  :class:`StoreBatchSampler` is a batch sampler that shards indices over ranks and can shuffle
  *chunk-aware* (chunk order shuffled, rows shuffled within a window of a few chunks) for stores
  larger than memory.

A batch is a dict::

    {"index": int64 [B], "input": float [B, ...], "label": int64 [B] (-1 = unlabeled),
     "view": int64 [B], "targets": {store field: tensor [B, ...]}}

``targets`` holds exactly the requested fields (``method.needs``), one view per row and -- for
``logsumexp`` -- the column of the chosen temperature (``[B]``). ``topk_indices`` are int64.
Built for a method (:meth:`DistillDataset.for_method`), ``targets`` holds instead that method's
*loss-ready* rows when it has them (:meth:`softlabels.losses.DistillationMethod.prepare_rows`:
the teacher distribution at T with its logs, computed once for preloaded arrays, so that a batch
is a row gather and the loss does not rebuild its target every step; per batch otherwise).
Several (dataset, store) pairs -- a labelled train split and an unlabeled transfer split --
are concatenated by :class:`ConcatDistillDataset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.errors import IncompleteStoreError, InvalidTargetsError, SchemaMismatchError, SpecError
from softlabels.stores import format as fmt
from softlabels.stores.reader import SoftLabelStore, open_store

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

VIEW_MODES = ("first", "next", "random")
DEFAULT_PRELOAD_BYTES = 1 << 30


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


def _json(value: Any) -> Any:
    """Normalise to what a JSON round trip gives (tuples -> lists), for comparing with metadata."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def store_dataset_metadata(info: Any) -> dict[str, Any]:
    """The ``schema.dataset`` dict a store records for a dataset split (:class:`DatasetInfo`),
    as ``softlabels dump`` writes it: ``info.to_dict()`` (spec, split, num_samples, num_classes,
    input_shape, preprocessing, content_sha256) plus ``labels_sha256``."""
    meta = _json(info.to_dict())
    meta["labels_sha256"] = None if info.labels is None else fmt.labels_fingerprint(info.labels)
    return meta


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
        return {"field": self.field, "store_value": _json(self.store_value), "run_value": _json(self.run_value)}


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
        for key, here in (("spec", info.spec), ("split", info.split), ("input_shape", _json(list(info.input_shape)))):
            if recorded.get(key) is not None and recorded[key] != here:
                out.append(StoreDifference(key, recorded[key], here))
        if recorded.get("preprocessing") is not None:
            pre = _leaf_differences(_json(recorded["preprocessing"]), _json(info.preprocessing), "preprocessing")
            out += [StoreDifference(path, a, b) for path, a, b in pre]
    same_rows = n_here == store.num_samples
    stored_fp = recorded.get("labels_sha256")
    if stored_fp is not None and same_rows:
        labels = _labels_of(dataset, info)
        if labels is None:
            out.append(StoreDifference("labels_sha256", stored_fp, None, note="this dataset is unlabeled"))
        elif fmt.labels_fingerprint(labels) != stored_fp:
            here_fp = fmt.labels_fingerprint(labels)
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


# --------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _random_views(index: np.ndarray, views: int, seed: int, epoch: int) -> np.ndarray:
    """A view per row that depends only on (seed, epoch, sample index): identical whichever
    worker or rank reads the row."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))
        return (_splitmix64(index.astype(np.uint64) ^ key) % np.uint64(views)).astype(np.int64)


class BatchIndices(list):
    """A list of sample indices that also carries the epoch it belongs to, so that per-epoch
    view selection is right in (persistent) DataLoader workers too."""

    epoch: int = 0

    def __init__(self, indices: Iterable[int], epoch: int = 0) -> None:
        super().__init__(indices)
        self.epoch = int(epoch)

    def __reduce__(self):
        return (BatchIndices, (list(self), self.epoch))


# --------------------------------------------------------------------------------------
# One (dataset, store) pair
# --------------------------------------------------------------------------------------
def _as_store(store: SoftLabelStore | str | None) -> SoftLabelStore | None:
    if store is None or isinstance(store, SoftLabelStore):
        if store is not None and store.meta.status != "complete":
            raise IncompleteStoreError(
                f"{store.location} is incomplete (status '{store.meta.status}'); finish it with "
                "`softlabels dump ... --resume` before training from it"
            )
        return store
    return open_store(store)


def _array_nbytes(store: SoftLabelStore, name: str) -> int:
    spec = {s.name: s for s in store.schema.fields()}[name]
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


class DistillDataset(torch.utils.data.Dataset):
    """A dataset joined row by row to a store (or to nothing, for label-only training).

    Args:
        dataset: the base dataset; item ``i -> (x, y)``. In-memory datasets exposing
            ``.inputs``/``.targets`` tensors are indexed with the whole batch at once.
        store: a store path or an open :class:`SoftLabelStore` (must be complete); None for
            label-only methods (``ce``, ``ls``).
        info: the dataset's ``DatasetInfo`` (enables the spec/split/preprocessing checks).
        fields: store arrays to deliver in ``targets`` (e.g. ``method.needs``).
        temperature: which ``logsumexp`` column to deliver (required when it is a field).
        k: deliver only the first k of the stored top-k (None = all; must be <= stored k).
        views: ``"first"`` (view 0), ``"next"`` (view ``epoch % V``) or ``"random"`` (a
            view per row and epoch, from ``seed``). A store dumped with ``--augment`` records
            each view's explicit parameters (``augment/*``): the input of a row is then that
            view rebuilt from the raw sample by the same :mod:`softlabels.augment` code the dump
            ran, bit-identical to what the teacher saw.
        student_augment: a student-only augmentation spec (``shift1d:max=N``, ``noise:std=S``,
            ``flip``), drawn fresh per (seed, epoch, sample) and applied after any replayed
            view. The teacher never saw it.
        prepare_for: a loss method: deliver its loss-ready targets (``prepare_rows`` of the
            fields) instead of the raw fields when it has them -- prepared once for every row
            (and view) when all fields are preloaded, per batch otherwise.
        preload: hold the requested non-feature arrays (and features, if they still fit)
            in memory when their total is at most ``preload_bytes``; ``False`` never,
            ``True`` always.
    """

    def __init__(
        self,
        dataset: Any,
        store: SoftLabelStore | str | None = None,
        *,
        info: Any | None = None,
        fields: Iterable[str] = (),
        temperature: float | None = None,
        k: int | None = None,
        views: str = "first",
        seed: int = 0,
        allow_mismatch: bool = False,
        preload: bool | str = "auto",
        preload_bytes: int = DEFAULT_PRELOAD_BYTES,
        student_augment: str | None = None,
        prepare_for: Any = None,
    ) -> None:
        from softlabels.augment import get_student_augment

        self.dataset = dataset
        self.info = info
        self.store = _as_store(store)
        self.fields = tuple(sorted(set(fields)))
        if views not in VIEW_MODES:
            raise SpecError(f"views must be one of {', '.join(VIEW_MODES)}, got {views!r}")
        self.views = views
        self.seed = int(seed)
        self.epoch = 0
        self.warnings: list[str] = []
        self.k = None if k is None else int(k)
        self.temperature = None if temperature is None else float(temperature)
        self._inputs = getattr(dataset, "inputs", None)
        self._targets = getattr(dataset, "targets", None)
        if not isinstance(self._inputs, torch.Tensor) or not isinstance(self._targets, torch.Tensor):
            self._inputs = self._targets = None
        self._ready: dict[str, np.ndarray] = {}
        self.preloaded: tuple[str, ...] = ()
        self._method = prepare_for
        self._prepared: dict[str, np.ndarray] = {}
        self._n_views, self._single_view = 1, True
        self._policy: Any = None
        self._view_params: dict[str, np.ndarray] = {}
        self.student_augment = get_student_augment(student_augment)
        if self.student_augment is not None and info is not None:
            self.student_augment.check_shape(tuple(info.input_shape))
        if self.store is None:
            if self.fields:
                raise SpecError(f"store fields {list(self.fields)} requested but no store given; pass --store")
            self.num_samples = int(info.num_samples) if info is not None else len(dataset)
            return
        self.num_samples = self.store.num_samples
        self._n_views = self.store.views
        self._single_view = self._n_views == 1 or self.views == "first"
        self.warnings += check_store_matches(self.store, dataset, info, allow_mismatch=allow_mismatch)
        self._load_view_params()
        self._check_fields()
        if preload:
            self._preload(force=preload is True, budget=int(preload_bytes))
        if self._method is not None:
            self._prepare_all()

    def _load_view_params(self) -> None:
        """A store dumped with ``--augment``: its policy and every view's parameters, in memory
        (a few bytes per row and view) so that a batch's views are one row gather."""
        from softlabels.augment import policy_from_metadata

        policy = policy_from_metadata(self.store.schema.augmentation)
        if policy is None:
            return
        if self.info is not None:
            policy.check_dataset(self.dataset, self.info)
        self._policy = policy
        self._view_params = {
            spec.name[len(fmt.AUGMENT_PREFIX) :]: self.store.array(spec.name)[...]
            for spec in self.store.schema.per_sample_arrays()
            if spec.name.startswith(fmt.AUGMENT_PREFIX)
        }

    @classmethod
    def for_method(
        cls, dataset: Any, store: SoftLabelStore | str | None, method: Any, *, prepare: bool = True, **kwargs: Any
    ) -> DistillDataset:
        """The fields and temperature a :mod:`softlabels.losses` method needs (``method.needs``,
        ``method.temperature``); with ``prepare`` (default), batches carry the method's
        loss-ready targets when it has them (see ``prepare_for``)."""
        fields = sorted(method.needs)
        temperature = method.temperature if fmt.LOGSUMEXP in method.needs else None
        prepare_for = method if prepare else None
        return cls(dataset, store, fields=fields, temperature=temperature, prepare_for=prepare_for, **kwargs)

    # -- construction checks ------------------------------------------------------------
    def _check_fields(self) -> None:
        store = self.store
        where = store.location
        available = {s.name for s in store.schema.fields()}
        for name in self.fields:
            if name in available:
                continue
            if name.startswith(fmt.FEATURES_PREFIX):
                have = ", ".join(store.feature_names) or "none"
                raise InvalidTargetsError(
                    f"store {where} has no feature array {name[len(fmt.FEATURES_PREFIX):]!r} (it has: {have}); "
                    "re-dump with that feature or choose another method"
                )
            if name in (fmt.LABEL_LOGIT, fmt.LABELS):
                raise InvalidTargetsError(
                    f"store {where} is unlabeled (a transfer set) and has no {name!r}; methods that need "
                    "ground-truth labels cannot train from it (use kd or kd-topk)"
                )
            raise InvalidTargetsError(f"store {where} has no array {name!r}; it has: {', '.join(sorted(available))}")
        if fmt.LOGSUMEXP in self.fields:
            if self.temperature is None:
                raise SpecError("reading 'logsumexp' needs a temperature (one of the store's grid)")
            from softlabels.targets import temperature_index

            temperature_index(store.temperatures, self.temperature)  # raises a clear error
        if self.k is not None:
            if self.k < 1:
                raise SpecError(f"k must be >= 1, got {self.k}")
            if self.k > store.k:
                raise InvalidTargetsError(
                    f"k={self.k} but store {where} only holds the top-{store.k} logits; use --k <= {store.k} "
                    f"or re-dump with --k {self.k}"
                )

    def _preload(self, *, force: bool, budget: int) -> None:
        small = [f for f in self.fields if not f.startswith(fmt.FEATURES_PREFIX)]
        feats = [f for f in self.fields if f.startswith(fmt.FEATURES_PREFIX)]
        size = sum(_array_nbytes(self.store, f) for f in small)
        chosen = small if force or size <= budget else []
        if chosen:
            size_feats = sum(_array_nbytes(self.store, f) for f in feats)
            if force or size + size_feats <= budget:
                chosen = chosen + feats
        elif force:
            chosen = feats
        for name in chosen:
            self._ready[name] = self._batch_ready(name, self.store.load(name))
        self.preloaded = tuple(chosen)

    def _batch_ready(self, name: str, arr: np.ndarray) -> np.ndarray:
        """A whole array reduced once to what batches need: the temperature's ``logsumexp``
        column, the first k of the top-k, and the view axis dropped when only view 0 is read.
        Smaller than the stored array, and a batch is then one numpy row gather per field."""
        if name == fmt.LOGSUMEXP:
            from softlabels.targets import temperature_index

            arr = arr[..., temperature_index(self.store.temperatures, self.temperature)]
        if self.k is not None and name in (fmt.TOPK_VALUES, fmt.TOPK_INDICES):
            arr = arr[..., : self.k]
        if name != fmt.LABELS and self._single_view:
            arr = arr[:, 0]
        return np.ascontiguousarray(arr)

    def _prepare_all(self) -> None:
        """The method's loss-ready rows for every row (and view) of the preloaded arrays, once.
        Left empty (batches are then prepared one by one) when a field is not in memory or the
        method declines (no prepared form, or too large)."""
        if self.store is None or not self.preloaded_all or fmt.LABELS in self.fields:
            return
        if any(name.startswith(fmt.FEATURES_PREFIX) for name in self.fields):
            return
        views = 1 if self._single_view else self._n_views
        fields = {}
        for name, arr in self._ready.items():
            if name == fmt.TOPK_INDICES:
                arr = arr.astype(np.int64)
            fields[name] = torch.from_numpy(arr.reshape(self.num_samples * views, *arr.shape[1 + (views > 1) :]))
        labels = None
        if self._method.requires_labels:
            labels = torch.from_numpy(np.repeat(self._labels(np.arange(self.num_samples)).numpy(), views))
        prepared = self._method.prepare_rows(fields, labels)
        if prepared is None:
            return
        shape = (self.num_samples,) if views == 1 else (self.num_samples, views)
        self._prepared = {name: t.numpy().reshape(*shape, *t.shape[1:]) for name, t in prepared.items()}
        self._ready = {}  # the raw rows are no longer read: do not hold (or pickle to workers) them twice

    @property
    def preloaded_all(self) -> bool:
        """True when every requested field is in memory (then a full shuffle costs nothing)."""
        return self.store is None or set(self.fields) <= set(getattr(self, "preloaded", ()))

    # -- Dataset protocol ---------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    @property
    def labeled(self) -> bool:
        """Whether the base dataset has labels (a transfer split has none)."""
        if self.info is not None:
            return self.info.labels is not None
        if self._targets is not None:
            return bool((self._targets >= 0).any())
        return True

    def chunk_bounds(self) -> np.ndarray:
        """Start rows of the store's read chunks, plus ``N`` at the end (for chunk-aware shuffling)."""
        rows = self.store.schema.rows_per_chunk if self.store is not None else max(self.num_samples, 1)
        return np.append(np.arange(0, self.num_samples, rows), self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for view selection when the indices do not carry one (see BatchIndices)."""
        self.epoch = int(epoch)

    def view_for(self, index: np.ndarray, epoch: int) -> np.ndarray | int:
        n_views = self._n_views
        if self._single_view:
            return 0
        if self.views == "next":
            return epoch % n_views
        return _random_views(index, n_views, self.seed, epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_np", None)  # numpy views of the tensors: rebuilt on the other side
        return state

    def _inputs_labels(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inputs is not None:
            if self._inputs.device.type != "cpu":
                t = torch.from_numpy(index).to(self._inputs.device)
                return self._inputs.index_select(0, t), self._targets.index_select(0, t)
            views = self.__dict__.get("_np")
            if views is None:  # numpy fancy indexing of a few rows is ~10x cheaper than torch's
                views = self._np = (self._inputs.numpy(), self._targets.numpy())
            return torch.from_numpy(views[0][index]), torch.from_numpy(views[1][index])
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(index.tolist()) if getitems else [self.dataset[int(i)] for i in index]
        if not isinstance(items, list):
            raise TypeError("the base dataset's __getitems__ must return a list of (x, y) items")
        xs = torch.stack([torch.as_tensor(x) for x, _ in items]) if items else torch.empty(0)
        ys = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
        return xs, ys

    def _labels(self, index: np.ndarray) -> torch.Tensor:
        """Labels ``[B]`` int64 (-1 = unlabeled) without loading the inputs."""
        if self._targets is not None:
            return self._targets.cpu()[torch.from_numpy(index)]
        if self.info is not None:
            if self.info.labels is None:
                return torch.full(index.shape, -1, dtype=torch.int64)
            return torch.from_numpy(np.asarray(self.info.labels, dtype=np.int64)[index])
        return self._inputs_labels(index)[1]

    def read_targets(
        self, index: np.ndarray, view: np.ndarray | int, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch's targets: the method's prepared rows (one row gather each) when they
        exist; else one row gather per preloaded field and one vectorised ``store.read`` for the
        fields that are not in memory, made loss-ready here when built for a method that can
        (``labels``: the batch's, for a method whose target depends on them)."""
        if self._prepared:
            if self._single_view:
                return {name: torch.from_numpy(arr[index]) for name, arr in self._prepared.items()}
            return {name: torch.from_numpy(arr[index, view]) for name, arr in self._prepared.items()}
        raw = self._read_fields(index, view)
        method = self._method
        if method is not None and self.store is not None:
            prepared = method.prepare_rows(raw, labels if method.requires_labels else None)
            if prepared is not None:
                return prepared
        return raw

    def _read_fields(self, index: np.ndarray, view: np.ndarray | int) -> dict[str, torch.Tensor]:
        if self.store is None or not self.fields:
            return {}
        arrays: dict[str, np.ndarray] = {}
        for name, arr in self._ready.items():
            if arr.ndim == 1 or name == fmt.LABELS or self._single_view:
                arrays[name] = arr[index]
            else:
                arrays[name] = arr[index, view]
        rest = [name for name in self.fields if name not in self._ready]
        if rest:
            for name, arr in self.store.read(index, rest, view=view, temperature=self.temperature).items():
                if self.k is not None and name in (fmt.TOPK_VALUES, fmt.TOPK_INDICES):
                    arr = arr[..., : self.k]
                arrays[name] = arr
        out: dict[str, torch.Tensor] = {}
        for name in self.fields:
            arr = arrays[name]
            if name == fmt.TOPK_INDICES:
                arr = arr.astype(np.int64)
            out[name] = torch.from_numpy(np.ascontiguousarray(arr))
        return out

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """The collated batch for ``indices`` (one store read)."""
        epoch = getattr(indices, "epoch", self.epoch)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_samples):
            raise IndexError(f"indices must lie in 0..{self.num_samples - 1}")
        view = self.view_for(index, epoch)
        if self._policy is not None:  # replay the stored view: what the teacher saw
            params = {name: arr[index, view] for name, arr in self._view_params.items()}
            x, y = self._policy.build(self.dataset, index, params), self._labels(index)
        else:
            x, y = self._inputs_labels(index)
        if self.student_augment is not None:  # student only: the teacher never saw this
            x = self.student_augment(x, index, self.seed, epoch)
        if isinstance(view, int):
            view_t = torch.full(index.shape, view, dtype=torch.int64)
        else:
            view_t = torch.from_numpy(view)
        return {
            "index": torch.from_numpy(index),
            "input": x,
            "label": y,
            "view": view_t,
            "targets": self.read_targets(index, view, y),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([int(i)])
        return _unbatch(batch)

    def __repr__(self) -> str:
        where = "no store" if self.store is None else self.store.location
        return f"DistillDataset(N={self.num_samples}, store={where}, fields={list(self.fields)}, views={self.views})"


def _unbatch(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        key: ({n: t[0] for n, t in value.items()} if key == "targets" else value[0]) for key, value in batch.items()
    }


# --------------------------------------------------------------------------------------
# Several pairs (labelled train split + unlabeled transfer split)
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
class StoreBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank, reshuffled every epoch (:meth:`set_epoch`).

    ``shuffle``: ``False`` (dataset order), ``True`` (a full permutation) or ``"chunks"``
    (chunk-aware: the store's read chunks in random order, rows shuffled within windows of
    ``window_chunks`` consecutive chunks of that order -- each chunk is decoded about once per
    epoch, so stores larger than memory stream at disk speed). Every rank computes the same
    epoch order from ``seed`` and takes its shard: a contiguous block in chunk mode (so a rank
    reads its own chunks), every ``world_size``-th index otherwise. Like
    ``DistributedSampler``, the order is padded by repeating its start so that every rank gets
    the same number of samples (``pad=False`` truncates instead). Yields :class:`BatchIndices`.
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
    ) -> None:
        if batch_size < 1:
            raise SpecError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SpecError(f"rank {rank} is outside 0..{world_size - 1}")
        if shuffle not in (True, False, "chunks"):
            raise SpecError(f"shuffle must be True, False or 'chunks', got {shuffle!r}")
        self.num_samples = data if isinstance(data, int) else len(data)
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
        n, w = self.num_samples, self.world_size
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
