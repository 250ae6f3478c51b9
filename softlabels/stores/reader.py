"""Reading a store: read-only, vectorised, shard- and chunk-grouped.

Per-item Zarr reads run at a few hundred rows/s. This reader fills a full-size buffer per field a
shard at a time on first touch (compact fields decoded once) when it fits a quarter of the cache,
else decodes each touched chunk into a bounded LRU cache; rows are gathered by numpy fancy
indexing. :meth:`SoftLabelStore.preload` holds whole fields in memory.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from softlabels.errors import IncompleteStoreError, NotAStoreError, StoreNotFoundError
from softlabels.stores import format as fmt
from softlabels.stores.guard import CompleteStoreGuard, MissingArrayError, read_error
from softlabels.stores.location import bytes_on_disk, is_remote, location_exists, open_zarr_store
from softlabels.stores.metadata import StoreMetadata, read_metadata

DEFAULT_CACHE_BYTES = 1 << 30
_CODEC_FIELDS = (fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP, fmt.LABEL_LOGIT)
_PICKLED = ("location", "allow_incomplete", "cache_bytes", "storage_options")


def open_store(
    location: str | os.PathLike,
    *,
    allow_incomplete: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    storage_options: dict | None = None,
    zarr_store: Any = None,
) -> SoftLabelStore:
    """Open a store read-only. Refuses stores that are still being written unless
    ``allow_incomplete`` (used by ``info`` and ``verify``). ``zarr_store``: read through this
    zarr store instead of opening ``location`` (a staging copy being verified)."""
    return SoftLabelStore(
        location, allow_incomplete=allow_incomplete, cache_bytes=cache_bytes, storage_options=storage_options,
        zarr_store=zarr_store,
    )


def _frozen(block: np.ndarray) -> np.ndarray:
    """Buffers the reader keeps are read-only; what it returns are fancy-indexed copies, so a
    caller that edits a batch never changes the next read."""
    block.flags.writeable = False
    return block


class SoftLabelStore:
    """A read-only handle on a softlabels store.

    Picklable: DataLoader workers and Ray tasks re-open the store lazily on their side.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        allow_incomplete: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        storage_options: dict | None = None,
        zarr_store: Any = None,
    ) -> None:
        self.location = str(location)
        self.allow_incomplete = allow_incomplete
        self.cache_bytes = int(cache_bytes)
        self.storage_options = storage_options
        self._open(zarr_store)

    def _open(self, given: Any = None) -> None:
        loc = self.location
        if given is None and not is_remote(loc) and not os.path.exists(loc):
            raise StoreNotFoundError(f"store {loc} does not exist; check the path (or run `softlabels dump` first)")
        store = given or open_zarr_store(loc, read_only=True, storage_options=self.storage_options)
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            if is_remote(loc) and not location_exists(loc, self.storage_options):
                raise StoreNotFoundError(f"store {loc} does not exist; check the URL") from None
            raise NotAStoreError(
                f"{loc} is not a softlabels store (no Zarr v3 group there); point at a store written by "
                "`softlabels dump`"
            ) from None
        except (ValueError, TypeError) as exc:  # zarr.json is damaged: not JSON, or not Zarr metadata
            raise NotAStoreError(
                f"{loc}: its zarr.json is damaged ({' '.join(str(exc).split())[:200]}); run `softlabels verify {loc}`"
            ) from None
        raw = read_metadata(group, loc)
        try:
            self.meta = StoreMetadata.from_raw(raw)
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise NotAStoreError(
                f"{loc}: the softlabels metadata in its zarr.json is damaged ({type(exc).__name__}: {exc}); "
                f"run `softlabels verify {loc}`"
            ) from None
        if not self.allow_incomplete:
            self.check_complete()
        if self.meta.status == "complete":
            store = CompleteStoreGuard(store)
            store.arrays = tuple(spec.name for spec in self.schema.all_arrays())
            store.location, store.rows_per_shard = loc, self.schema.rows_per_shard
            group = zarr.open_group(store, mode="r", zarr_format=3)
        self._zstore = store
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}
        self._memory: dict[str, np.ndarray] = {}
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_used = 0
        self._lazy: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._codec = self.schema.compact  # None for fp16 stores

    def check_complete(self) -> None:
        """Refuse a store whose dump has not finished (the one "store is incomplete" check)."""
        if self.meta.status != "complete":
            raise IncompleteStoreError(
                f"{self.location} is incomplete (status '{self.meta.status}'); finish it with "
                "`softlabels dump ... --resume` before training from it"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in _PICKLED}, "memory": self._memory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _PICKLED:
            setattr(self, name, state[name])
        self._open()
        self._memory = {name: _frozen(arr) for name, arr in state["memory"].items()}

    # -- metadata shortcuts --------------------------------------------------------
    @property
    def schema(self) -> fmt.StoreSchema:
        return self.meta.schema

    @property
    def num_samples(self) -> int:
        return self.schema.num_samples

    @property
    def num_classes(self) -> int:
        return self.schema.num_classes

    @property
    def k(self) -> int:
        return self.schema.k

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.schema.temperatures

    @property
    def views(self) -> int:
        return self.schema.views

    @property
    def labeled(self) -> bool:
        return self.schema.labeled

    @property
    def feature_names(self) -> list[str]:
        return [name for name, _ in self.schema.features]

    def array(self, name: str) -> zarr.Array:
        """The underlying (read-only) zarr array, for bulk access."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self._group[name]
            except KeyError:
                names = [s.name for s in self.schema.all_arrays()]
                if name not in names:
                    raise KeyError(f"the store format has no array {name!r}; a store has: {', '.join(names)}") from None
                if self.meta.status != "complete":
                    why = f"it is still being created (status '{self.meta.status}')"
                else:
                    why = f"the store is damaged; run `softlabels verify {self.location}`"
                raise MissingArrayError(f"{self.location} has no array {name!r} yet: {why}") from None
        return self._arrays[name]

    def completed_units(self) -> np.ndarray:
        return np.asarray(self.array(fmt.UNITS_COMPLETE)[:], dtype=bool)

    def bytes_on_disk(self) -> int:
        return bytes_on_disk(self._zstore)

    def classifier(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Teacher classifier weight ``[C, D]`` and bias ``[C]`` (None when not stored)."""
        if self.schema.classifier_dim is None:
            return None, None
        weight = self.array(fmt.CLASSIFIER_WEIGHT)[...]
        bias = self.array(fmt.CLASSIFIER_BIAS)[...] if self.schema.classifier_bias else None
        return weight, bias

    # -- bulk ----------------------------------------------------------------------
    def _default_fields(self) -> list[str]:
        return [s.name for s in self.schema.fields() if not s.name.startswith(fmt.FEATURES_PREFIX)]

    def _decoded(self, name: str) -> bool:
        """Whether ``name`` is a field the compact codec decodes (not a stored array)."""
        return self.schema.codec is not None and name in _CODEC_FIELDS

    def load(self, name: str) -> np.ndarray:
        """A whole per-sample field as readers see it (decoded for compact stores)."""
        memory = self._memory.get(name)
        if memory is not None:
            return memory.copy()
        if not self._decoded(name):
            return self._read(name, 0, self.num_samples)
        codec, schema = self._codec, self.schema
        parts = []
        for unit in range(schema.num_units):  # bounded memory: one unit's coded rows at a time
            start, stop = schema.unit_range(unit)
            raw = self._read_many(codec.needs([name]), start, stop)
            parts.append(codec.decode(raw, [name])[name])
        return np.concatenate(parts)

    def preload(self, fields: Iterable[str] | None = None) -> SoftLabelStore:
        """Hold whole per-sample fields in memory (bulk-read, millions of rows/s; decoded once
        for compact stores). Defaults to every per-sample field except features."""
        names = list(fields) if fields is not None else self._default_fields()
        for name in names:
            if name not in self._memory:
                self._memory[name] = _frozen(self.load(name))
        return self

    def _chunk(self, name: str, chunk: int) -> np.ndarray:
        key = (name, chunk)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        rows = self.schema.rows_per_chunk
        block = _frozen(self._read(name, chunk * rows, (chunk + 1) * rows))
        self._cache[key] = block
        self._cache_used += block.nbytes
        while self._cache_used > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.nbytes
        return block

    def _lazy_buffer(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A full-size buffer for ``name`` (stored, or decoded by the compact codec) and its
        per-shard "filled" flags, or None unless it fits a quarter of the cache (decoded fields:
        all together). After warm-up a random batch is one fancy-index per field."""
        if name not in self._lazy:  # decided once per field: None when it does not fit
            if self._decoded(name):
                specs = {s.name: s for s in self.schema.fields() if s.name in _CODEC_FIELDS}
                nbytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
                shape, dtype = specs[name].shape, np.dtype(specs[name].dtype)
            else:
                arr = self.array(name)
                shape, dtype = arr.shape, arr.dtype
                nbytes = int(np.prod(shape)) * dtype.itemsize
            n_shards = -(-self.num_samples // self.schema.rows_per_shard)
            fits = nbytes * 4 <= self.cache_bytes
            self._lazy[name] = (np.empty(shape, dtype), np.zeros(n_shards, dtype=bool)) if fits else None
        return self._lazy[name]

    def _fill(self, names: list[str], idx: np.ndarray) -> None:
        """Fill the lazy buffers of ``names`` for the shards ``idx`` touches first, a whole shard
        at a time (zarr reads a shard's inner chunks for ~1/3 of the cost of reading them one by
        one), the shard's arrays in one event-loop call, compact fields decoded once."""
        rows = self.schema.rows_per_shard
        shards = np.unique(idx // rows)
        todo = shards[~np.logical_and.reduce([self._lazy[n][1][shards] for n in names])]
        coded = [n for n in names if self._decoded(n)]
        stored = [n for n in names if n not in coded]
        stored += [a for a in self._codec.needs(coded) if a not in stored] if coded else []
        for shard in todo:
            lo, hi = int(shard) * rows, min((int(shard) + 1) * rows, self.num_samples)
            raw = self._read_many(stored, lo, hi)
            if coded:
                raw.update(self._codec.decode(raw, coded))
            for name in names:
                buf, filled = self._lazy[name]
                buf[lo:hi] = raw[name]
                filled[shard] = True

    def _read_many(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of several per-sample arrays, in one event-loop call."""
        arrays = [self.array(name).async_array for name in names]  # opened (and checked) outside the loop

        async def read_all() -> list:
            return await asyncio.gather(*(a.getitem(slice(start, stop)) for a in arrays), return_exceptions=True)

        out = dict(zip(names, sync(read_all())))
        for name, got in out.items():
            if isinstance(got, BaseException):  # a KeyboardInterrupt or cancellation is not damage
                rows = f"{start}..{min(stop, self.num_samples) - 1}"
                raise (read_error(self.location, name, rows, got) if isinstance(got, Exception) else got) from None
        return out

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a per-sample array; damage is one line naming the array."""
        try:
            return self.array(name)[start:stop]
        except KeyError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise many types for bad bytes
            stop = min(stop, self.num_samples)
            raise read_error(self.location, name, f"{start}..{stop - 1}", exc) from None

    def gather(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``indices`` (any order, repeats allowed) of one per-sample array."""
        return self._gather(name, self._check_indices(indices))

    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices must lie in 0..{n - 1} for a store of {n} samples")
        if idx.size and idx.min() < 0:
            idx = np.where(idx < 0, idx + n, idx)
        return idx

    def _gather(self, name: str, idx: np.ndarray) -> np.ndarray:
        memory = self._memory.get(name)
        if memory is not None:
            return memory[idx]
        if self._lazy_buffer(name) is not None:
            self._fill([name], idx)
            return self._lazy[name][0][idx]
        if self._decoded(name):
            return self._decode_rows([name], idx)[name]
        rows = self.schema.rows_per_chunk
        arr = self.array(name)
        out = np.empty((idx.size, *arr.shape[1:]), dtype=arr.dtype)
        if idx.size == 0:
            return out
        chunk_of = idx // rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds):
            chunk = int(chunk_of[group[0]])
            block = self._chunk(name, chunk)
            out[group] = block[idx[group] - chunk * rows]
        return out

    def _decode_rows(self, names: list[str], idx: np.ndarray) -> dict[str, np.ndarray]:
        """Compact fields too big for lazy buffers: the batch's coded rows decoded together."""
        return self._codec.decode({a: self._gather(a, idx) for a in self._codec.needs(names)}, names)

    def read(
        self,
        indices: Sequence[int] | np.ndarray,
        fields: Iterable[str] | None = None,
        *,
        view: int | np.ndarray | None = None,
        temperature: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Vectorised read of a batch of rows.

        ``fields`` defaults to every per-sample array except features. ``view``: None keeps
        the view axis (``[B, V, ...]``); an int or a per-row int array selects one view per row
        (``[B, ...]``). ``temperature`` selects that column of ``logsumexp`` (``[B(, V)]``).
        """
        names = list(fields) if fields is not None else self._default_fields()
        idx = self._check_indices(indices)
        out: dict[str, np.ndarray] = {}
        t_col = None
        if temperature is not None:
            from softlabels.targets import temperature_index  # torch: not needed by info/verify/copy

            t_col = temperature_index(self.temperatures, temperature)
        rows = None
        if view is not None:
            views = np.asarray(view, dtype=np.int64)
            if views.size and (views.min() < 0 or views.max() >= self.views):
                raise IndexError(f"view must lie in 0..{self.views - 1}")
            if views.ndim:
                views = np.broadcast_to(views, idx.shape)
                rows = np.arange(idx.size)
            else:
                views = int(views)
        lazy = [n for n in names if n not in self._memory and self._lazy_buffer(n) is not None]
        if lazy:  # every field's chunks in one go: one read per chunk for all of them
            self._fill(lazy, idx)
        coded = [n for n in names if self._decoded(n) and n not in self._memory and n not in lazy]
        decoded = self._decode_rows(coded, idx) if coded else {}
        for name in names:
            data = self._lazy[name][0][idx] if name in lazy else decoded.get(name)
            data = self._gather(name, idx) if data is None else data
            if view is not None and name != fmt.LABELS:
                data = data[:, views] if rows is None else data[rows, views]
            if name == fmt.LOGSUMEXP and t_col is not None:
                data = data[..., t_col]
            out[name] = data
        return out

    def __repr__(self) -> str:
        s = self.schema
        return (
            f"SoftLabelStore({self.location!r}, N={s.num_samples}, C={s.num_classes}, k={s.k}, "
            f"T={list(s.temperatures)}, views={s.views}, status={self.meta.status})"
        )
