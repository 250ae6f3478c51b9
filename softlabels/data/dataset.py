"""A dataset joined row by row to a store: batches of (inputs, labels, teacher targets).

Row ``i`` of a store is sample ``i`` of the dataset it was dumped from, so a student batch is
"these indices of the dataset" plus "these rows of the store". Targets are read for a *whole
batch* at once: arrays small enough to preload (by default up to 1 GiB in total) are held in
memory already reduced to what a batch needs (the temperature's ``logsumexp`` column, the first
k, view 0), so a batch is one row gather per field; everything else is one ``store.read`` per
batch. ``__getitems__`` returns the collated batch (PyTorch's DataLoader calls it with a batch
of indices)::

    {"index": int64 [B], "input": float [B, ...], "label": int64 [B] (-1 = unlabeled),
     "view": int64 [B], "targets": {store field: tensor [B, ...]}}

Built for a method (:meth:`DistillDataset.for_method`), ``targets`` holds that method's
loss-ready rows when it has them (:meth:`softlabels.losses.DistillationMethod.prepare_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from softlabels.data.provenance import check_store_matches
from softlabels.data.views import VIEW_MODES, _random_views
from softlabels.datasets.info import in_memory
from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.stores import format as fmt
from softlabels.stores.reader import SoftLabelStore, open_store
from softlabels.targets import check_k

DEFAULT_PRELOAD_BYTES = 1 << 30


def _as_store(store: SoftLabelStore | str | None) -> SoftLabelStore | None:
    if store is None or isinstance(store, SoftLabelStore):
        if store is not None:
            store.check_complete()  # it may have been opened with allow_incomplete
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
        train_transform: the student's training view of raw images (``build(dataset, index, seed,
            epoch)``, :mod:`softlabels.train_transforms`); ignored when stored views are replayed.
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
        allow_mismatch: bool | Sequence[str] = False,
        preload: bool | str = "auto",
        preload_bytes: int = DEFAULT_PRELOAD_BYTES,
        student_augment: str | None = None,
        prepare_for: Any = None,
        train_transform: Any = None,
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
        self._inputs, self._targets = in_memory(dataset) or (None, None)
        self._ready: dict[str, np.ndarray] = {}
        self.preloaded: tuple[str, ...] = ()
        self._method = prepare_for
        self._prepared: dict[str, np.ndarray] = {}
        self._n_views, self._single_view = 1, True
        self._policy: Any = None
        self._view_params: dict[str, np.ndarray] = {}
        self.student_augment = get_student_augment(student_augment)
        self.train_transform = train_transform  # see softlabels.train_transforms; unused when replaying views
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
            check_k(self.k, store.k, f"store {where}")

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
        elif self.train_transform is not None:  # the student's own random view (no stored targets for it)
            x, y = self.train_transform.build(self.dataset, index, self.seed, epoch), self._labels(index)
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
