"""Checking the data of a store unit by unit: shards present and decodable, unit digests, and
the semantic checks. Shared by ``verify`` (which lists every problem) and by the check a
student's training runs before it uses a store (which refuses in one line).

Error texts never quote stored bytes: a chunk may be a link to a secret file, and a decoder's
message may echo what it read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from zarr.core.sync import sync

from softlabels.errors import DamagedStoreError, SoftlabelsError
from softlabels.stores import format as fmt
from softlabels.stores.digest import check_expected, parse_expected, store_digest, unit_digest
from softlabels.stores.metadata import check_metadata_documents, metadata_digests, read_metadata_documents
from softlabels.stores.reader import SoftLabelStore, open_store
from softlabels.stores.semantic import SemanticReport, unit_violations


def shard_key(name: str, spec: fmt.ArraySpec, index: int) -> str:
    return f"{name}/c/" + "/".join([str(index)] + ["0"] * (len(spec.shape) - 1))


def why(exc: BaseException) -> str:
    """What went wrong reading a chunk, without the exception's text (it may quote the bytes)."""
    if isinstance(exc, DamagedStoreError):
        return "missing"
    text = str(exc).lower()
    if "checksum" in text or "crc" in text:
        return "checksum mismatch"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ClientError", "ConnectionError", "TimeoutError", "BotoCoreError"}:
        return f"could not be read ({type(exc).__name__}: a network error, not necessarily damage; retry)"
    return f"cannot be decoded ({type(exc).__name__})"


def check_unit(
    store: SoftLabelStore, unit: int, specs: list[fmt.ArraySpec], complete: bool, recorded: np.ndarray | None
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


def check_shapes(store: SoftLabelStore) -> None:
    """Every array's own metadata gives the schema's shape and dtype: counts in the root metadata
    are not trusted to size a read, a listing or an allocation."""
    for spec in store.schema.all_arrays():
        try:
            arr = store.array(spec.name)
        except KeyError:
            raise DamagedStoreError(f"{store.location} is damaged: array {spec.name} is missing; run `softlabels "
                                    f"verify {store.location}`") from None
        except Exception as exc:  # noqa: BLE001 - its zarr.json is not Zarr metadata
            raise DamagedStoreError(f"{store.location} is damaged: the metadata of array {spec.name} {why(exc)}; "
                                    f"run `softlabels verify {store.location}`") from None
        if tuple(arr.shape) != spec.shape or str(arr.dtype) != spec.dtype:
            raise DamagedStoreError(
                f"{store.location} is damaged: array {spec.name} has shape {tuple(arr.shape)} {arr.dtype}, the store's "
                f"schema says {spec.shape} {spec.dtype}; run `softlabels verify {store.location}`"
            )


def computed_digest(store: SoftLabelStore, unit_rows: np.ndarray) -> tuple[str, list[str]]:
    """The store digest of the content as it is now, and the metadata problems found on the way."""
    docs, problems = read_metadata_documents(store._zstore)
    return store_digest(metadata_digests(docs), unit_rows), problems


def open_checked_stores(
    locations: list[str], *, storage_options: dict | None = None, expect_digests: Sequence[str] | None = None
) -> list[SoftLabelStore]:
    """The stores a training run reads, each checked (:func:`check_for_training`) before use.
    ``expect_digests`` pins them in order (``--expect-digest``, once per ``--store``)."""
    expected = [parse_expected(d) for d in expect_digests or []]
    if expected and len(expected) != len(locations):
        raise SoftlabelsError(
            f"--expect-digest was given {len(expected)} time(s) for {len(locations)} --store; pass one per store, in order"
        )
    return [
        open_checked_store(loc, storage_options=storage_options, expect_digest=expected[i] if expected else None)
        for i, loc in enumerate(locations)
    ]


def open_checked_store(
    location: str, *, storage_options: dict | None = None, expect_digest: str | None = None
) -> SoftLabelStore:
    """Open a complete store for training and check it first (:func:`check_for_training`)."""
    store = open_store(location, storage_options=storage_options)
    check_for_training(store, expect_digest=expect_digest)
    return store


def check_for_training(store: SoftLabelStore, *, expect_digest: str | None = None) -> None:
    """Refuse, in one line, a complete store whose per-sample data is missing, damaged, altered
    or impossible as teacher targets, or that is not the pinned one. Reads every unit once."""
    schema, loc = store.schema, store.location
    hint = f"run `softlabels verify {loc}` for the full list"
    check_shapes(store)
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
