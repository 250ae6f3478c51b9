"""Copying a complete store between locations (local, ``s3://``, from ``http(s)://``), byte for byte.

Objects are copied verbatim through zarr's store API (``get`` / ``set``, async with bounded
concurrency): nothing is decoded or re-encoded, so the copy keeps every checksum.

The source is untrusted. Before anything is written: every key must be a plain relative key that
the format defines (no absolute key, no ``.``/``..``/empty segment: nothing can land outside the
destination), and a local source must hold no symbolic link. The objects then go to a *staging*
location next to the destination (``DST.staging-<id>``), without the root ``zarr.json``; the
staging copy is verified in full with the source's root document held in memory. Only when it
verifies is the root written and the staging copy put in place of the destination (a rename on
local disk; on object stores the old destination is deleted and the verified objects are copied
over, root last). A source that fails, or a copy that is interrupted, leaves the old
destination as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softlabels.errors import IncompleteStoreError, SoftlabelsError, StoreExistsError
from softlabels.stores import format as fmt
from softlabels.stores.digest import check_expected
from softlabels.stores.integrity import check_shapes
from softlabels.stores.keys import METADATA_KEY, defined_keys, unsafe_key
from softlabels.stores.location import (
    is_remote,
    location_exists,
    open_zarr_store,
    remote_errors,
    remove_location,
    store_keys,
)
from softlabels.stores.metadata import read_metadata
from softlabels.stores.reader import open_store
from softlabels.stores.staging import RootOverlay, local_symlinks
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
    expect_digest: str | None = None,
) -> CopyResult:
    """Copy the complete store at ``source`` to ``destination`` through a verified staging copy.

    ``on_start(objects)`` and ``on_object(nbytes)`` (called from zarr's event-loop thread)
    drive a progress display. ``seconds`` and ``bytes`` cover the transfer, not the verify.
    ``expect_digest`` (``sha256:...``) must be the store digest of what was copied."""
    src, dst = str(source).rstrip("/"), str(destination).rstrip("/")
    if src == dst:
        raise SoftlabelsError(f"source and destination are the same location ({src}); choose another destination")
    reader = open_store(src, allow_incomplete=True, storage_options=source_options)
    if reader.meta.status != "complete":
        raise IncompleteStoreError(
            f"{src} is not complete (status '{reader.meta.status}'); finish it with `softlabels dump ... --resume` "
            "before copying it"
        )
    check_shapes(reader)  # the schema's counts size the key list: they must agree with the arrays
    keys = _source_keys(src, reader, source_options)
    if location_exists(dst, destination_options) or os.path.islink(dst):
        if not overwrite:
            raise StoreExistsError(f"{dst} already exists; pass --overwrite to replace it")
        _check_replaceable(dst, destination_options)
    src_store = open_zarr_store(src, read_only=True, storage_options=source_options)
    with remote_errors(src, source_options):
        root = sync(src_store.get(METADATA_KEY, default_buffer_prototype()))
    if root is None:
        raise SoftlabelsError(f"{src}: object {METADATA_KEY} is missing; run `softlabels verify {src}`")
    if is_remote(dst):  # names the destination in a missing-bucket or read-only error; writes nothing
        open_zarr_store(dst, read_only=False, storage_options=destination_options)
    staging = f"{dst}.staging-{uuid.uuid4().hex[:12]}"
    try:
        stage_store = open_zarr_store(staging, read_only=False, storage_options=destination_options)
        t0 = time.perf_counter()  # before on_start: the progress bar's clock and the summary's agree
        if on_start is not None:
            on_start(len(keys) + 1)
        with remote_errors(src, source_options), remote_errors(dst, destination_options):
            nbytes = sync(_transfer(src_store, stage_store, keys, concurrency, staging, on_object))
        seconds = time.perf_counter() - t0
        report = verify_store(staging, storage_options=destination_options, zarr_store=RootOverlay(stage_store, root))
        if not report.ok:
            raise CopyVerifyError(
                f"the copy of {src} failed verification ({len(report.problems)} problem(s), first: "
                f"{report.problems[0]}); {dst} was not changed; check the source with `softlabels verify {src}`",
                report,
            )
        check_expected(src, expect_digest, report.digest or "unknown")
        sync(stage_store.set(METADATA_KEY, root))  # verified: now it may become a store
        if on_object is not None:
            on_object(len(root))
        _put_in_place(staging, dst, destination_options, concurrency)
    except BaseException:
        with contextlib.suppress(Exception):
            remove_location(staging, destination_options)
        raise
    return CopyResult(src, dst, len(keys) + 1, nbytes + len(root), seconds, report.chunks_checked, report.units_checked)


def _source_keys(src: str, reader, options: dict | None) -> list[str]:
    """The keys to copy, root excluded, array metadata first; refuses unsafe or undefined keys
    and symbolic links in a local source."""
    if not is_remote(src):
        links = local_symlinks(src)
        if links:
            raise SoftlabelsError(
                f"refusing to copy {src}: it contains a symbolic link ({links[0]}{f' and {len(links) - 1} more' if len(links) > 1 else ''}); "
                "a store holds only plain files: copy the files themselves, or check where the store came from"
            )
    with remote_errors(src, options):
        listed = [k for k in store_keys(reader._zstore) if k != METADATA_KEY]
    bad = [k for k in listed if unsafe_key(k)]
    if bad:
        raise SoftlabelsError(
            f"refusing to copy {src}: it holds object key {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}, "
            "which is not a plain relative key (absolute, or with '.', '..' or empty segments) and could write "
            "outside the destination; the source was tampered with"
        )
    defined = defined_keys(reader.schema)
    newer = fmt.newer_minor(reader.meta.format_version)  # its extra objects are the newer format's: copy them
    extra = [] if newer else [k for k in listed if k not in defined]
    if extra:
        raise SoftlabelsError(
            f"refusing to copy {src}: it holds object {extra[0]!r}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, "
            f"which the store format does not define; run `softlabels verify {src}`"
        )
    return sorted(listed, key=lambda k: not k.endswith(METADATA_KEY))


async def _transfer(src_store, dst_store, keys: list[str], concurrency: int, where: str, on_object) -> int:
    gate = asyncio.Semaphore(max(1, concurrency))
    local = None if is_remote(where) else os.path.realpath(where)

    async def one(key: str) -> int:
        if local is not None and not os.path.realpath(os.path.join(local, key)).startswith(local + os.sep):
            raise SoftlabelsError(f"refusing to write object {key!r} outside {where}")
        async with gate:
            value = await src_store.get(key, default_buffer_prototype())
            if value is None:
                raise SoftlabelsError(f"object {key} is missing at the source; run `softlabels verify` on it")
            await dst_store.set(key, value)
        if on_object is not None:
            on_object(len(value))
        return len(value)

    return sum(await asyncio.gather(*(one(key) for key in keys)))


def _put_in_place(staging: str, dst: str, options: dict | None, concurrency: int) -> None:
    """Replace ``dst`` with the verified ``staging`` copy (which then no longer exists)."""
    if not is_remote(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:12]}"
        had_old = os.path.lexists(dst)
        if had_old:
            os.rename(dst, old)
        os.rename(staging, dst)
        if had_old:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            else:
                os.unlink(old)
        return
    # Object stores cannot rename: the verified objects are copied over, root last.
    if location_exists(dst, options):
        remove_location(dst, options)
    stage_store = open_zarr_store(staging, read_only=True, storage_options=options)
    dst_store = open_zarr_store(dst, read_only=False, storage_options=options)
    with remote_errors(dst, options):
        keys = [k for k in store_keys(stage_store) if k != METADATA_KEY]
        sync(_transfer(stage_store, dst_store, keys, concurrency, dst, None))
        sync(_transfer(stage_store, dst_store, [METADATA_KEY], 1, dst, None))
    remove_location(staging, options)


def _check_replaceable(location: str, storage_options: dict | None) -> None:
    """Only a softlabels store, or an interrupted copy of one, may be replaced; never a link."""
    if not is_remote(location) and os.path.islink(location):
        raise StoreExistsError(
            f"refusing to overwrite {location}: it is a symbolic link; remove the link yourself or choose another "
            "destination"
        )
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
