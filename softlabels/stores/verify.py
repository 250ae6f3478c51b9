"""Full integrity check of a store.

Four independent layers, so that every kind of damage is named by the file it is in:
1. metadata documents: every ``zarr.json`` parses, and its canonical sha256 equals the one the
   writer recorded at finalize (``metadata_sha256``), so a flipped byte in a codec setting, a
   shape or the recorded dataset identity is caught;
2. schema: every array the schema names exists with the schema's shape and dtype, and the
   status agrees with the completion records;
3. chunks: every stored shard of every array is present (for completed units) and decodes --
   the crc32c codec inside each shard rejects flipped bytes, the shard index's own crc32c
   rejects truncation; each ``units/*`` chunk is read on its own so the damaged one is named;
4. units: every completed unit's arrays re-hash to the sha256 recorded at write time, which also
   catches data that decodes but is not what was written (e.g. a deleted shard read as fill).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from zarr.core.sync import sync

from softlabels.errors import InvalidTargetsError, NotAStoreError, UnsupportedFormatError
from softlabels.stores import format as fmt
from softlabels.stores.location import open_zarr_store
from softlabels.stores.metadata import check_metadata_documents
from softlabels.stores.reader import SoftLabelStore, open_store
from softlabels.stores.writer import unit_digest


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    units_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _shard_key(name: str, spec: fmt.ArraySpec, index: int) -> str:
    return f"{name}/c/" + "/".join([str(index)] + ["0"] * (len(spec.shape) - 1))


def verify_store(location: str | os.PathLike, *, storage_options: dict | None = None) -> VerifyReport:
    """Re-read every metadata document and chunk of the store; check checksums and digests."""
    report = VerifyReport(location=str(location))
    problems = report.problems
    try:
        store = open_store(location, allow_incomplete=True, storage_options=storage_options)
    except (NotAStoreError, UnsupportedFormatError, InvalidTargetsError) as exc:
        # Damaged root metadata can make the store unopenable: name the damaged file if we can.
        zstore = open_zarr_store(location, read_only=True, storage_options=storage_options)
        problems += check_metadata_documents(zstore)
        if not problems:
            raise
        why = str(exc).split("; run `softlabels verify")[0]
        problems.append(f"metadata zarr.json: the store cannot be opened ({why})")
        return report
    problems += check_metadata_documents(store._zstore)
    schema = store.schema
    if store.meta.status not in ("writing", "complete"):
        problems.append(f"status is {store.meta.status!r}, neither 'writing' nor 'complete'")

    present: dict[str, fmt.ArraySpec] = {}
    for spec in schema.all_arrays():
        try:
            arr = store.array(spec.name)
        except KeyError:
            problems.append(f"array {spec.name}: missing")
            continue
        except Exception as exc:  # noqa: BLE001 - its zarr.json is damaged (also named by layer 1)
            problems.append(f"array {spec.name}: metadata {spec.name}/zarr.json unreadable ({_why(exc)})")
            continue
        if tuple(arr.shape) != spec.shape or str(arr.dtype) != spec.dtype:
            problems.append(
                f"array {spec.name}: shape {tuple(arr.shape)} dtype {arr.dtype}, schema says {spec.shape} {spec.dtype}"
            )
            continue
        present[spec.name] = spec

    complete, digests = _unit_records(store, present, problems)
    if store.meta.status == "complete" and not complete.all():
        missing = np.flatnonzero(~complete)
        problems.append(
            f"status is 'complete' but {missing.size} unit(s) are not recorded complete: {_list(missing)}"
        )
    if store.meta.status == "complete" and store.meta.summary is None:
        problems.append("status is 'complete' but the summary statistics are missing")

    # Layers 3 and 4: chunks, then unit digests. Constant arrays are single-chunk; per-sample
    # arrays have one shard per unit.
    zstore = store._zstore
    for spec in schema.constant_arrays():
        if spec.name not in present or spec.name.startswith("units/"):
            continue
        report.chunks_checked += 1
        if not sync(zstore.exists(_shard_key(spec.name, spec, 0))):
            problems.append(f"chunk {_shard_key(spec.name, spec, 0)}: missing")
            continue
        try:
            store.array(spec.name)[...]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"chunk {_shard_key(spec.name, spec, 0)}: {_why(exc)}")

    if fmt.UNITS_CODEC_FIDELITY in present:  # the compact codec's per-unit record: one chunk per unit
        spec = present[fmt.UNITS_CODEC_FIDELITY]
        for unit in np.flatnonzero(complete):
            key = _shard_key(spec.name, spec, int(unit))
            report.chunks_checked += 1
            if not sync(zstore.exists(key)):
                problems.append(f"chunk {key}: missing (unit {unit})")
                continue
            try:
                store.array(spec.name)[int(unit)]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"chunk {key}: {_why(exc)} (unit {unit})")

    per_sample = [s for s in schema.per_sample_arrays() if s.name in present]
    order = [s.name for s in schema.per_sample_arrays()]
    for unit in range(schema.num_units):
        start, stop = schema.unit_range(unit)
        unit_bad = False
        for spec in per_sample:
            key = _shard_key(spec.name, spec, unit)
            report.chunks_checked += 1
            if complete[unit] and not sync(zstore.exists(key)):
                problems.append(f"chunk {key}: missing (unit {unit}, rows {start}..{stop - 1})")
                unit_bad = True
                continue
            try:
                data = store.array(spec.name)[start:stop]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"chunk {key}: {_why(exc)} (unit {unit}, rows {start}..{stop - 1})")
                unit_bad = True
                continue
            if complete[unit] and digests[unit] is not None:
                want = bytes(digests[unit][order.index(spec.name)])
                if unit_digest(data) != want:
                    problems.append(
                        f"chunk {key}: content differs from the sha256 recorded at write time "
                        f"(unit {unit}, rows {start}..{stop - 1})"
                    )
                    unit_bad = True
        if complete[unit] and not unit_bad:
            report.units_checked += 1
    return report


def _unit_records(
    store: SoftLabelStore, present: dict[str, fmt.ArraySpec], problems: list[str]
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Each unit's completion flag and sha256 rows, read chunk by chunk so that a damaged or
    missing ``units/*`` chunk is named. A complete store must have every chunk; a store being
    written lacks the chunks of units not recorded yet."""
    schema = store.schema
    zstore = store._zstore
    finished = store.meta.status == "complete"
    # A complete store promises every unit: a damaged flag chunk is named, and the unit's data is
    # still checked. In a store being written, an unreadable flag means "not recorded".
    complete = np.full(schema.num_units, finished and fmt.UNITS_COMPLETE not in present)
    digests: list[np.ndarray | None] = [None] * schema.num_units
    for name in (fmt.UNITS_COMPLETE, fmt.UNITS_SHA256):
        if name not in present:
            continue
        spec = present[name]
        for unit in range(schema.num_units):
            key = _shard_key(name, spec, unit)
            if not sync(zstore.exists(key)):
                if finished or (name == fmt.UNITS_SHA256 and complete[unit]):
                    problems.append(f"chunk {key}: missing (unit {unit})")
                    complete[unit] |= finished
                continue
            try:
                value = store.array(name)[unit]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
                problems.append(f"chunk {key}: {_why(exc)} (unit {unit})")
                complete[unit] |= finished
                continue
            if name == fmt.UNITS_COMPLETE:
                complete[unit] = bool(value)
            else:
                digests[unit] = np.asarray(value)
    return complete, digests


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "checksum" in text.lower() or "crc" in text.lower():
        return f"checksum mismatch ({text})"
    return f"unreadable ({type(exc).__name__}: {text})"


def _list(units: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(u)) for u in units[:limit])
    return shown + (f", ... ({units.size - limit} more)" if units.size > limit else "")


__all__ = ["verify_store", "VerifyReport", "SoftLabelStore"]
