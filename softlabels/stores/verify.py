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
   catches data that decodes but is not what was written (e.g. a deleted shard read as fill);
5. semantics: indices in 0..C-1 and unique per row, finite log-probabilities <= 0, finite
   normalisers no smaller than the values they normalise, finite features (stores.semantic);
6. store digest: the digest of the content equals the one recorded at finalize (stores.digest);
7. no object the format does not define, no unsafe key, no symbolic link.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from zarr.core.sync import sync

from softlabels.errors import InvalidTargetsError, NotAStoreError, UnsupportedFormatError
from softlabels.stores import format as fmt
from softlabels.stores.integrity import check_unit, computed_digest, shard_key, why
from softlabels.stores.keys import defined_keys, unsafe_key
from softlabels.stores.location import is_http, is_remote, open_zarr_store, store_keys
from softlabels.stores.metadata import STORE_DIGEST_KEY, check_metadata_documents
from softlabels.stores.reader import SoftLabelStore, open_store
from softlabels.stores.semantic import SemanticReport, unit_violations
from softlabels.stores.staging import local_symlinks


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    units_checked: int = 0
    digest: str | None = None  # the store digest of the content as verified (None if unit records are damaged)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(
    location: str | os.PathLike,
    *,
    storage_options: dict | None = None,
    expect_digest: str | None = None,
    zarr_store=None,
) -> VerifyReport:
    """Re-read every metadata document and chunk of the store; check checksums and digests.
    ``expect_digest`` (``sha256:...``) must equal the digest of the content (--expect-digest);
    ``zarr_store`` reads the store through that zarr store (a staging copy, stores.copy)."""
    report = VerifyReport(location=str(location))
    problems = report.problems
    try:
        store = open_store(location, allow_incomplete=True, storage_options=storage_options, zarr_store=zarr_store)
    except (NotAStoreError, UnsupportedFormatError, InvalidTargetsError) as exc:
        # Damaged root metadata can make the store unopenable: name the damaged file if we can.
        zstore = zarr_store or open_zarr_store(location, read_only=True, storage_options=storage_options)
        problems += check_metadata_documents(zstore)
        if not problems:
            raise
        reason = str(exc).split("; run `softlabels verify")[0]
        problems.append(f"metadata zarr.json: the store cannot be opened ({reason})")
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
            problems.append(f"array {spec.name}: metadata {spec.name}/zarr.json unreadable ({why(exc)})")
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
        if not sync(zstore.exists(shard_key(spec.name, spec, 0))):
            problems.append(f"chunk {shard_key(spec.name, spec, 0)}: missing")
            continue
        try:
            store.array(spec.name)[...]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"chunk {shard_key(spec.name, spec, 0)}: {why(exc)}")

    if fmt.UNITS_CODEC_FIDELITY in present:  # the compact codec's per-unit record: one chunk per unit
        spec = present[fmt.UNITS_CODEC_FIDELITY]
        for unit in np.flatnonzero(complete):
            key = shard_key(spec.name, spec, int(unit))
            report.chunks_checked += 1
            if not sync(zstore.exists(key)):
                problems.append(f"chunk {key}: missing (unit {unit})")
                continue
            try:
                store.array(spec.name)[int(unit)]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"chunk {key}: {why(exc)} (unit {unit})")

    per_sample = [s for s in schema.per_sample_arrays() if s.name in present]
    semantic = SemanticReport()
    for unit in range(schema.num_units):
        found, arrays, checked = check_unit(store, unit, per_sample, bool(complete[unit]), digests[unit])
        problems += found
        report.chunks_checked += checked
        if complete[unit] and not found:
            report.units_checked += 1
            semantic.add(unit, unit_violations(schema, arrays))
    problems += semantic.problems(schema)  # layer 5: values that no teacher can have produced
    if fmt.UNITS_SHA256 in present and all(d is not None for d in digests):
        report.digest, _ = computed_digest(store, np.stack(digests))
    problems += _digest_problems(store, report.digest)
    problems += _undefined_objects(store)
    if expect_digest is not None and report.digest != expect_digest:
        problems.append(f"store digest: {report.digest or 'unknown (unit records damaged)'}, not the expected "
                        f"{expect_digest} (--expect-digest)")
    return report


def _digest_problems(store: SoftLabelStore, actual: str | None) -> list[str]:
    """Layer 6: the store digest recorded at finalize equals the one of the content as it is."""
    recorded = store.meta.raw.get(STORE_DIGEST_KEY)
    if store.meta.status != "complete":
        return []
    if recorded is None:
        if _version_at_least(store.meta.format_version, (1, 2)):
            return [f"metadata zarr.json: a complete format-{store.meta.format_version} store must record "
                    f"'{STORE_DIGEST_KEY}' but has none"]
        return []
    if actual is None:
        return []  # the unit records are damaged, and named already
    if actual != recorded:
        return [f"store digest: the content's digest is {actual}, zarr.json records {recorded}: units or metadata "
                "were swapped or edited after finalize"]
    return []


def _undefined_objects(store: SoftLabelStore) -> list[str]:
    """Layer 7: objects the format does not define (a listable store holds exactly the defined
    keys), unsafe keys, and -- on local disk -- symbolic links, which a store never contains."""
    loc = store.location
    if is_http(loc):
        return []  # nothing can be listed over plain HTTP; every defined key was read above
    problems = []
    if not is_remote(loc):
        for link in local_symlinks(loc):
            problems.append(f"object {link}: a symbolic link; a store holds only plain files")
    defined = defined_keys(store.schema)
    newer = fmt.newer_minor(store.meta.format_version)  # may define objects this reader does not know
    for key in store_keys(store._zstore):
        if unsafe_key(key):
            problems.append(f"object {key!r}: not a plain relative key (absolute, '.', '..' or empty segments)")
        elif key not in defined and not newer:
            problems.append(f"object {key}: not defined by the format for this schema")
    return problems


def _version_at_least(version: str, want: tuple[int, int]) -> bool:
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= want
    except ValueError:
        return True


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
            key = shard_key(name, spec, unit)
            if not sync(zstore.exists(key)):
                if finished or (name == fmt.UNITS_SHA256 and complete[unit]):
                    problems.append(f"chunk {key}: missing (unit {unit})")
                    complete[unit] |= finished
                continue
            try:
                value = store.array(name)[unit]
            except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
                problems.append(f"chunk {key}: {why(exc)} (unit {unit})")
                complete[unit] |= finished
                continue
            if name == fmt.UNITS_COMPLETE:
                complete[unit] = bool(value)
            else:
                digests[unit] = np.asarray(value)
    return complete, digests


def _list(units: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(u)) for u in units[:limit])
    return shown + (f", ... ({units.size - limit} more)" if units.size > limit else "")


__all__ = ["verify_store", "VerifyReport", "SoftLabelStore"]
