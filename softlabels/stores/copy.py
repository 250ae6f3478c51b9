"""Copying a complete store between locations (local, ``s3://``, from ``http(s)://``), byte for byte.

Objects are copied verbatim through zarr's store API (``get`` / ``set``, async with bounded
concurrency): nothing is decoded or re-encoded, so the copy keeps every checksum. The root
``zarr.json`` -- which carries the softlabels metadata and ``status: complete`` -- is written
last, so an interrupted copy never looks like a store. The copy is then verified in full.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softlabels.errors import IncompleteStoreError, SoftlabelsError, StoreExistsError
from softlabels.stores.keys import METADATA_KEY
from softlabels.stores.location import (
    location_exists,
    open_zarr_store,
    remote_errors,
    remove_location,
    store_keys,
)
from softlabels.stores.metadata import read_metadata
from softlabels.stores.reader import open_store
from softlabels.stores.verify import VerifyReport, verify_store

DEFAULT_CONCURRENCY = 16


class CopyVerifyError(SoftlabelsError):
    """The copy does not verify; ``report`` names every bad chunk."""

    exit_code = 1

    def __init__(self, message: str, report: VerifyReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    objects: int
    bytes: int
    seconds: float
    chunks_verified: int
    units_verified: int

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def copy_store(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    source_options: dict | None = None,
    destination_options: dict | None = None,
    overwrite: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_start: Callable[[int], None] | None = None,
    on_object: Callable[[int], None] | None = None,
) -> CopyResult:
    """Copy the complete store at ``source`` to ``destination`` and verify the copy.

    ``on_start(objects)`` and ``on_object(nbytes)`` (called from zarr's event-loop thread)
    drive a progress display. ``seconds`` and ``bytes`` cover the transfer, not the verify."""
    src, dst = str(source), str(destination)
    if src.rstrip("/") == dst.rstrip("/"):
        raise SoftlabelsError(f"source and destination are the same location ({src}); choose another destination")
    reader = open_store(src, allow_incomplete=True, storage_options=source_options)
    if reader.meta.status != "complete":
        raise IncompleteStoreError(
            f"{src} is not complete (status '{reader.meta.status}'); finish it with `softlabels dump ... --resume` "
            "before copying it"
        )
    if location_exists(dst, destination_options):
        if not overwrite:
            raise StoreExistsError(f"{dst} already exists; pass --overwrite to replace it")
        _check_replaceable(dst, destination_options)
        remove_location(dst, destination_options)
    src_store = open_zarr_store(src, read_only=True, storage_options=source_options)
    dst_store = open_zarr_store(dst, read_only=False, storage_options=destination_options)
    with remote_errors(src, source_options):
        listed = [k for k in store_keys(src_store) if k != METADATA_KEY]
    # array metadata first (an interrupted copy is then recognisable for --overwrite), root last
    keys = sorted(listed, key=lambda k: not k.endswith(METADATA_KEY)) + [METADATA_KEY]
    t0 = time.perf_counter()
    if on_start is not None:
        on_start(len(keys))

    async def transfer(key: str, gate: asyncio.Semaphore) -> int:
        async with gate:
            value = await src_store.get(key, default_buffer_prototype())
            if value is None:
                raise SoftlabelsError(f"{src}: object {key} is missing; run `softlabels verify {src}`")
            await dst_store.set(key, value)
        if on_object is not None:
            on_object(len(value))
        return len(value)

    async def transfer_all() -> int:
        gate = asyncio.Semaphore(max(1, concurrency))
        body = await asyncio.gather(*(transfer(key, gate) for key in keys[:-1]))
        return sum(body) + await transfer(METADATA_KEY, gate)  # the commit marker, last

    with remote_errors(src, source_options), remote_errors(dst, destination_options):
        nbytes = sync(transfer_all())
    seconds = time.perf_counter() - t0
    report = verify_store(dst, storage_options=destination_options)
    if not report.ok:
        # The copy is verbatim, so damage came from the source: do not leave a store that
        # claims to be complete. Without its root metadata the copy is not a store at all.
        sync(dst_store.delete(METADATA_KEY))
        raise CopyVerifyError(
            f"the copy at {dst} failed verification ({len(report.problems)} problem(s), first: {report.problems[0]}); "
            f"its {METADATA_KEY} was removed so it cannot be used; check the source with `softlabels verify {src}`",
            report,
        )
    return CopyResult(src, dst, len(keys), nbytes, seconds, report.chunks_checked, report.units_checked)


def _check_replaceable(location: str, storage_options: dict | None) -> None:
    """Only a softlabels store, or an interrupted copy of one, may be replaced."""
    store = open_zarr_store(location, read_only=False, storage_options=storage_options)
    try:
        read_metadata(zarr.open_group(store, mode="r", zarr_format=3), location, check_version=False)
        return
    except Exception:  # noqa: BLE001 - not a readable store: maybe a partial copy
        pass
    if not sync(store.exists(f"units/{METADATA_KEY}")):
        raise StoreExistsError(
            f"refusing to overwrite {location}: it exists and is not a softlabels store; "
            "choose another destination or remove it yourself"
        )
