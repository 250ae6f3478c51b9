"""Checking the data of a store unit by unit: shards present and decodable, unit digests, and
the semantic checks. Shared by ``verify`` (which lists every problem) and by the check a
student's training runs before it uses a store (which refuses in one line).

Error texts never quote stored bytes: a chunk may be a link to a secret file, and a decoder's
message may echo what it read.
"""

from __future__ import annotations

import numpy as np
from zarr.core.sync import sync

from softlabels.errors import SoftlabelsError
from softlabels.stores import format as fmt
from softlabels.stores.digest import check_expected, store_digest
from softlabels.stores.metadata import check_metadata_documents, metadata_digests, read_metadata_documents
from softlabels.stores.semantic import SemanticReport, unit_violations
from softlabels.stores.writer import unit_digest


class DamagedStoreError(SoftlabelsError):
    """A store marked complete has a missing, undecodable or altered object."""

    exit_code = 1


def shard_key(name: str, spec: fmt.ArraySpec, index: int) -> str:
    return f"{name}/c/" + "/".join([str(index)] + ["0"] * (len(spec.shape) - 1))


def why(exc: BaseException) -> str:
    """What went wrong reading a chunk, without the exception's text (it may quote the bytes)."""
    if isinstance(exc, DamagedStoreError):
        return "missing"
    text = str(exc).lower()
    if "checksum" in text or "crc" in text:
        return "checksum mismatch"
    return f"cannot be decoded ({type(exc).__name__})"


def check_unit(
    store, unit: int, specs: list[fmt.ArraySpec], complete: bool, recorded: np.ndarray | None
) -> tuple[list[str], dict[str, np.ndarray], int]:
    """``(problems, arrays, chunks_checked)`` for one unit of the per-sample arrays ``specs``:
    each shard must exist (when the unit is recorded complete) and decode, and re-hash to the
    digest recorded for it."""
    schema = store.schema
    zstore = store._zstore
    order = [s.name for s in schema.per_sample_arrays()]
    start, stop = schema.unit_range(unit)
    where = f"unit {unit}, rows {start}..{stop - 1}"
    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        key = shard_key(spec.name, spec, unit)
        if complete and not sync(zstore.exists(key)):
            problems.append(f"chunk {key}: missing ({where})")
            continue
        try:
            data = store.array(spec.name)[start:stop]
        except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
            problems.append(f"chunk {key}: {why(exc)} ({where})")
            continue
        if complete and recorded is not None and unit_digest(data) != bytes(recorded[order.index(spec.name)]):
            problems.append(f"chunk {key}: content differs from the sha256 recorded at write time ({where})")
            continue
        arrays[spec.name] = data
    return problems, arrays, len(specs)


def computed_digest(store, unit_rows: np.ndarray) -> tuple[str, list[str]]:
    """The store digest of the content as it is now, and the metadata problems found on the way."""
    docs, problems = read_metadata_documents(store._zstore)
    return store_digest(metadata_digests(docs), unit_rows), problems


def check_for_training(store, *, expect_digest: str | None = None) -> None:
    """Refuse, in one line, a complete store whose per-sample data is missing, damaged, altered
    or impossible as teacher targets, or that is not the pinned one. Reads every unit once."""
    schema, loc = store.schema, store.location
    hint = f"run `softlabels verify {loc}` for the full list"
    try:
        unit_rows = np.asarray(store.array(fmt.UNITS_SHA256)[...])
    except Exception as exc:  # noqa: BLE001
        raise DamagedStoreError(f"{loc} is damaged: its units/sha256 records {why(exc)}; {hint}") from None
    specs = schema.per_sample_arrays()
    semantic = SemanticReport()
    for unit in range(schema.num_units):
        problems, arrays, _ = check_unit(store, unit, specs, True, unit_rows[unit])
        if problems:
            raise DamagedStoreError(f"{loc} is damaged: {problems[0]}; {hint}")
        semantic.add(unit, unit_violations(schema, arrays))
    found = semantic.problems(schema)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise DamagedStoreError(
            f"{loc} holds impossible teacher targets: {found[0]}{more}; it cannot have been written by a teacher "
            f"(crafted or buggy writer); {hint}"
        )
    if expect_digest is not None:
        if check_metadata_documents(store._zstore):
            raise DamagedStoreError(f"{loc} is damaged: its metadata documents do not match their digests; {hint}")
        actual, _ = computed_digest(store, unit_rows)
        check_expected(loc, expect_digest, actual)
