"""Writing a store: create / resume / overwrite, write whole units from any process, record
completion, finalize.

Protocol (mirrors a two-phase commit):
1. ``create`` writes the group metadata with ``status: "writing"`` and the schema, then the arrays.
2. Any process writes any unit with :meth:`StoreWriter.write_unit` -- a unit is exactly one shard
   of every per-sample array, so concurrent writers never touch the same object.
3. One process (the driver) records each unit with :meth:`mark_complete`: the unit's sha256 row
   first, then its ``units/complete`` flag, which is the commit marker for that unit.
4. :meth:`finalize` checks every unit is recorded, computes summary statistics, records the
   sha256 of every metadata document and flips the status to ``complete``. Readers refuse
   anything else.
A crash at any point leaves a store that ``resume`` continues from the last recorded unit.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from softlabels import __version__
from softlabels.errors import (
    IncompleteStoreError,
    InvalidTargetsError,
    SchemaMismatchError,
    StoreExistsError,
)
from softlabels.fields import dimension_names
from softlabels.stores import format as fmt
from softlabels.stores.codecs import compact_store
from softlabels.stores.location import bytes_on_disk, location_exists, open_zarr_store, remove_location
from softlabels.stores.digest import store_digest, unit_digest
from softlabels.stores.metadata import (
    METADATA_DIGEST_KEY,
    STORE_DIGEST_KEY,
    metadata_digests,
    read_metadata,
    read_metadata_documents,
)
from softlabels.stores.ownership import GENERATION_KEY, RUN_ID_KEY, check_owner, new_run_id
from softlabels.stores.summary import compute_summary



def check_create_mode(location: str, *, resume: bool, overwrite: bool, storage_options: dict | None = None) -> bool:
    """The one resume/overwrite rule: not both; an existing location needs one of them.
    Returns whether the location exists."""
    if resume and overwrite:
        raise StoreExistsError("--resume and --overwrite exclude each other; pass one of them")
    exists = location_exists(location, storage_options)
    if exists and not (resume or overwrite):
        raise StoreExistsError(f"{location} already exists; pass --resume to continue it or --overwrite to replace it")
    return exists


def _all_finite(data: np.ndarray) -> bool:
    """``np.isfinite(data).all()``; for float16 from the exponent bits, because numpy's
    ``isfinite`` on float16 runs ~10x slower than on float32 (no vectorised loop)."""
    if data.dtype == np.float16:
        return not ((data.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(data).all())


def _cast_float(data: np.ndarray, dtype: str) -> np.ndarray:
    """``data.astype(dtype)`` (overflow to inf allowed: the caller reports it). float32 ->
    float16 goes through torch, whose vectorised conversion is ~8x faster than numpy's and
    rounds identically (IEEE round-to-nearest-even, checked bit for bit in the tests)."""
    if data.dtype == np.float32 and np.dtype(dtype) == np.float16 and data.flags.writeable:
        import torch

        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float16).numpy()
    with np.errstate(over="ignore"):
        return data.astype(dtype)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StoreWriter:
    """Handle on a store that is being written. Cheap to construct in worker processes."""

    def __init__(
        self, location: str | os.PathLike, *, storage_options: dict | None = None, run_id: str | None = None
    ) -> None:
        """``run_id``: the dump run this writer works for; every write, record and finalize
        first checks that the run still owns the store (softlabels.stores.ownership)."""
        self.location = str(location)
        self.storage_options = storage_options
        self.run_id = run_id
        self._store = open_zarr_store(self.location, read_only=False, storage_options=storage_options)
        self._group = zarr.open_group(self._store, mode="r+", zarr_format=3)
        self.meta = read_metadata(self._group, self.location)
        self.schema = fmt.StoreSchema.from_dict(self.meta["schema"])
        self._arrays: dict[str, zarr.Array] = {}

    # -- construction ------------------------------------------------------------
    @classmethod
    def create(
        cls,
        location: str | os.PathLike,
        schema: fmt.StoreSchema,
        *,
        classifier_weight: np.ndarray | None = None,
        classifier_bias: np.ndarray | None = None,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: dict | None = None,
    ) -> StoreWriter:
        """Create a new store, or resume / replace an existing one.

        Without ``resume`` or ``overwrite``, an existing location is refused. ``resume`` requires
        the stored schema to equal ``schema`` field for field; ``overwrite`` only deletes
        something that is a softlabels store.
        """
        loc = str(location)
        exists = check_create_mode(loc, resume=resume, overwrite=overwrite, storage_options=storage_options)
        if exists and resume:
            writer = cls(loc, storage_options=storage_options)
            diffs = writer.schema.differences(schema)
            written = int(writer.completed_units().sum()) if diffs else 0
            if diffs and written:
                more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
                raise SchemaMismatchError(
                    f"cannot resume {loc}: {diffs[0]}{more}; {written} of {writer.schema.num_units} units are "
                    "already written with the store's settings: resume with those, or pass --overwrite instead "
                    "of --resume to start again with the new ones"
                )
            if not diffs:
                writer._take_ownership()
                writer._ensure_arrays(classifier_weight, classifier_bias)
                return writer
            # no unit written yet: nothing to keep, so the new settings simply start the store afresh
        generation = 1
        if exists:  # --overwrite, or a --resume of a store with no unit written (check_create_mode refused the rest)
            generation = _check_is_store_before_delete(loc, storage_options) + 1
            remove_location(loc, storage_options)
        _check_constants(schema, classifier_weight, classifier_bias)
        store = open_zarr_store(loc, read_only=False, storage_options=storage_options)
        meta = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.FORMAT_VERSION,
            "softlabels_version": __version__,
            "status": "writing",
            RUN_ID_KEY: new_run_id(),
            GENERATION_KEY: generation,
            "created": _now(),
            "completed": None,
            "schema": schema.to_dict(),
            "summary": None,
        }
        if schema.codec is not None:  # readers older than 1.2 cannot decode it: they must refuse (§8)
            meta[fmt.MIN_READER_KEY] = fmt.COMPACT_MIN_READER
        zarr.create_group(store, zarr_format=3, attributes={fmt.ATTRS_KEY: meta})
        writer = cls(loc, storage_options=storage_options, run_id=meta[RUN_ID_KEY])
        writer._ensure_arrays(classifier_weight, classifier_bias)
        return writer

    def _take_ownership(self) -> None:
        """A resume is a new run: record its run id, so that a run still writing stops. (A
        complete store is left as it is: a resume has nothing to write.)"""
        if self.meta.get("status") == "complete":
            self.run_id = self.meta.get(RUN_ID_KEY)
            return
        meta = dict(self.meta)
        meta[RUN_ID_KEY] = new_run_id()
        meta.setdefault(GENERATION_KEY, 1)
        self._group.attrs[fmt.ATTRS_KEY] = meta
        self.meta, self.run_id = meta, meta[RUN_ID_KEY]

    def check_owner(self, doing: str) -> None:
        check_owner(self._store, self.location, self.run_id, doing)

    def _ensure_arrays(self, classifier_weight: np.ndarray | None, classifier_bias: np.ndarray | None) -> None:
        """Create every array the schema names that is not there yet, then (re)write the teacher
        constants. Idempotent: a crash anywhere during creation is repaired by the resume,
        including one between creating the classifier array and filling it."""
        existing = set(_walk_arrays(self._group))
        for spec in self.schema.all_arrays():
            if spec.name in existing:
                continue
            parent, _, leaf = spec.name.rpartition("/")
            grp = self._group.require_group(parent) if parent else self._group
            grp.create_array(
                name=leaf,
                shape=spec.shape,
                dtype=spec.dtype,
                chunks=spec.chunks,
                shards=spec.shards,
                fill_value=0,
                dimension_names=_dimension_names(self.schema, spec.name),
                **fmt.codecs_for(spec),
            )
        constants = {fmt.CLASSIFIER_WEIGHT: classifier_weight, fmt.CLASSIFIER_BIAS: classifier_bias}
        for spec in self.schema.constant_arrays():
            if spec.name in constants:
                value = constants[spec.name]
                if value is None:
                    raise InvalidTargetsError(f"this store's schema has {spec.name} but no value was given for it")
                self._array(spec.name)[...] = np.asarray(value, dtype=np.float32)

    def _array(self, name: str) -> zarr.Array:
        # zarr skips chunks equal to the fill value by default; a unit of zeros (a zero bias,
        # a unit whose labels are all 0) must still be stored, or verify could not tell it
        # from a lost chunk. The setting is resolved when the array is opened.
        if name not in self._arrays:
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._arrays[name] = self._group[name]
        return self._arrays[name]

    def read_fields(self, start: int, stop: int, names: list[str]) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of per-sample fields as a reader sees them (decoded)."""
        codec = self.schema.compact
        if codec is None:
            return {n: self._array(n)[start:stop] for n in names}
        raw = {a: self._array(a)[start:stop] for a in codec.needs(names)}
        return codec.decode(raw, names)

    # -- units -------------------------------------------------------------------
    def completed_units(self) -> np.ndarray:
        return np.asarray(self._array(fmt.UNITS_COMPLETE)[:], dtype=bool)

    def bytes_on_disk(self) -> int:
        return bytes_on_disk(self._store)

    def pending_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.completed_units())]

    def prepare_unit(self, unit: int, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and cast a unit's fields to their storage dtypes (no I/O); a compact store
        encodes them (:mod:`softlabels.stores.codecs.compact`)."""
        start, stop = self.schema.unit_range(unit)
        rows = stop - start
        if self.schema.codec is not None:
            fields = compact_store.encode_unit(self.schema, unit, fields)
        specs = {s.name: s for s in self.schema.per_sample_arrays()}
        missing = sorted(set(specs) - set(fields))
        extra = sorted(set(fields) - set(specs))
        if missing or extra:
            raise InvalidTargetsError(f"unit {unit}: fields do not match the schema (missing {missing}, unexpected {extra})")
        out: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            data = np.asarray(fields[name])
            want = (rows, *spec.shape[1:])
            if data.shape != want:
                raise InvalidTargetsError(f"unit {unit}: {name} has shape {data.shape}, expected {want}")
            if np.issubdtype(data.dtype, np.floating):
                if not _all_finite(data):
                    raise InvalidTargetsError(
                        f"unit {unit}: {name} contains NaN/inf; nothing was written for this unit "
                        "(check the teacher checkpoint and input preprocessing)"
                    )
                if name in fmt.CLAMPED_LOG_PROBS and spec.dtype == "float16" and self._clamps():
                    data = np.maximum(data, fmt.FLOAT16_MIN)  # probability 0 at every stored T either way
                cast = _cast_float(data, spec.dtype)
                if not _all_finite(cast):
                    raise InvalidTargetsError(
                        f"unit {unit}: {name} overflows {spec.dtype} (|value| > {np.finfo(spec.dtype).max:g}); "
                        "dump again with --value-dtype float32 --overwrite"
                    )
            else:
                if name == fmt.TOPK_INDICES and (data.min(initial=0) < 0 or data.max(initial=0) >= self.schema.num_classes):
                    raise InvalidTargetsError(f"unit {unit}: class indices outside 0..{self.schema.num_classes - 1}")
                if name == fmt.LABELS and (data.min(initial=0) < 0 or data.max(initial=0) >= self.schema.num_classes):
                    raise InvalidTargetsError(
                        f"unit {unit}: labels outside 0..{self.schema.num_classes - 1}; an unlabeled dataset "
                        "must be dumped without labels"
                    )
                cast = data.astype(spec.dtype)
            out[name] = np.ascontiguousarray(cast)
        return out

    def _clamps(self) -> bool:
        """Whether float16 log-probabilities below -65504 are clamped (FORMAT.md §2): only when
        every stored temperature keeps their probability exactly 0 in float32."""
        return max(self.schema.temperatures) < fmt.CLAMP_MAX_TEMPERATURE

    def write_unit(self, unit: int, fields: Mapping[str, np.ndarray]) -> dict[str, str]:
        """Write one unit's rows of every per-sample array; return their sha256 digests (hex).

        Safe to call concurrently for *different* units from different processes, and to repeat
        for the same unit (the data is deterministic, the write idempotent). Does not record
        completion: that is :meth:`mark_complete`'s job, done once by the driver.
        """
        prepared = self.prepare_unit(unit, fields)
        start, stop = self.schema.unit_range(unit)
        self.check_owner(f"writing unit {unit}")
        digests = {name: unit_digest(data).hex() for name, data in prepared.items()}
        # One call into zarr's event loop for all arrays of the unit, not one per array: each
        # call has a fixed cost (a thread hand-off, a shard-read attempt) that was a large part
        # of a small unit's write time (benchmarks/dump_ceiling.py). Same bytes as a loop.
        arrays = {name: self._array(name).async_array for name in prepared}  # opened outside the loop

        async def write_all() -> None:
            await asyncio.gather(*(arrays[name].setitem(slice(start, stop), data) for name, data in prepared.items()))

        sync(write_all())
        if self.schema.codec is not None:  # this unit's own chunk: safe beside other writers
            self._array(fmt.UNITS_CODEC_FIDELITY)[unit] = compact_store.unit_fidelity(self.schema, fields, prepared)
        self.check_owner(f"returning unit {unit}")  # a late write into a new owner's store is reported
        return digests

    def mark_complete(self, unit: int, digests: Mapping[str, str]) -> None:
        """Record a written unit: its digests, then the completion flag (the commit marker)."""
        names = [s.name for s in self.schema.per_sample_arrays()]
        rows = np.stack([np.frombuffer(bytes.fromhex(digests[n]), dtype=np.uint8) for n in names])
        self.check_owner(f"recording unit {unit}")
        self._array(fmt.UNITS_SHA256)[unit] = rows
        self._array(fmt.UNITS_COMPLETE)[unit] = 1

    # -- finalize -----------------------------------------------------------------
    def finalize(self, extra_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Check completeness, write summary statistics, flip status to ``complete``."""
        pending = self.pending_units()
        if pending:
            raise IncompleteStoreError(
                f"{self.location}: {len(pending)} of {self.schema.num_units} units are not written "
                f"(first: {pending[0]}); resume the dump to finish them"
            )
        summary = compute_summary(self)
        if extra_summary:
            summary.update(extra_summary)
        meta = dict(self.meta)
        meta.update(status="complete", completed=_now(), summary=summary)
        meta.pop(METADATA_DIGEST_KEY, None)
        meta.pop(STORE_DIGEST_KEY, None)
        docs, _ = read_metadata_documents(self._store)
        meta[METADATA_DIGEST_KEY] = metadata_digests(docs, root_meta=meta)
        meta[STORE_DIGEST_KEY] = store_digest(meta[METADATA_DIGEST_KEY], self._array(fmt.UNITS_SHA256)[...])
        self.check_owner("finalizing")
        self._group.attrs[fmt.ATTRS_KEY] = meta
        self.meta = meta
        return summary


def _dimension_names(schema: fmt.StoreSchema, name: str) -> tuple[str, ...] | None:
    if schema.codec is not None and name.startswith("compact/"):
        return next(dims for n, dims, _, _ in schema.compact.arrays(schema.labeled) if n == name)
    return dimension_names(name)


def _walk_arrays(group: zarr.Group, prefix: str = "") -> list[str]:
    names = []
    for name, member in group.members():
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            names.append(path)
        else:
            names.extend(_walk_arrays(member, path + "/"))
    return names


def _check_constants(schema: fmt.StoreSchema, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
    if schema.classifier_dim is not None:
        if weight is None or tuple(np.shape(weight)) != (schema.num_classes, schema.classifier_dim):
            raise InvalidTargetsError(
                f"classifier weight must have shape ({schema.num_classes}, {schema.classifier_dim}), "
                f"got {None if weight is None else tuple(np.shape(weight))}"
            )
        if not np.isfinite(weight).all():
            raise InvalidTargetsError("the teacher's classifier weight contains NaN/inf; check the checkpoint")
        if schema.classifier_bias and (bias is None or tuple(np.shape(bias)) != (schema.num_classes,)):
            raise InvalidTargetsError(f"classifier bias must have shape ({schema.num_classes},)")


def _check_is_store_before_delete(location: str, storage_options: dict | None) -> int:
    """The generation of the store about to be replaced (0 when it records none)."""
    try:
        store = open_zarr_store(location, read_only=True, storage_options=storage_options)
        group = zarr.open_group(store, mode="r", zarr_format=3)
        generation = read_metadata(group, location, check_version=False).get(GENERATION_KEY)
        return generation if isinstance(generation, int) and 0 <= generation < 2**53 else 0
    except Exception:
        raise StoreExistsError(
            f"refusing to overwrite {location}: it exists and is not a softlabels store; "
            "choose another --out or remove it yourself"
        ) from None


__all__ = ["StoreWriter", "unit_digest", "compute_summary"]
