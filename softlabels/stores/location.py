"""Where a store lives: a local directory or an fsspec URL (``s3://``, ``http(s)://``, ...).

Everything else talks to a ``zarr`` store object, so local and remote stores share one code path.
Remote access failures (unreachable endpoint, missing bucket, no credentials, HTTP 404) become
one-line :class:`SoftlabelsError` messages here, at open time, instead of botocore tracebacks.

``storage_options`` go to fsspec unchanged (for s3: ``endpoint_url``, ``key``, ``secret``,
``anon``, ``client_kwargs``, ...). Without them s3fs reads the standard AWS environment
variables itself; :func:`resolve_storage_options` copies those into explicit options for
processes (Ray workers) that do not share the driver's environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from softlabels.errors import SoftlabelsError, StoreNotFoundError
from softlabels.stores import format as fmt
from softlabels.stores.keys import METADATA_KEY, object_keys

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "memory://")
HTTP_SCHEMES = ("http://", "https://")
HTTP_READ_ONLY = "http(s) stores are read-only; copy to s3:// or a local path"

# Standard AWS variables -> s3fs options; explicit options win over them.
_AWS_ENV = (
    ("key", ("AWS_ACCESS_KEY_ID",)),
    ("secret", ("AWS_SECRET_ACCESS_KEY",)),
    ("token", ("AWS_SESSION_TOKEN",)),
    ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
)


class RemoteStoreError(SoftlabelsError):
    """A remote store cannot be reached, its bucket is missing or access is refused."""


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(REMOTE_SCHEMES)


def is_http(location: str | os.PathLike) -> bool:
    return str(location).startswith(HTTP_SCHEMES)


def resolve_storage_options(location: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """Explicit options for ``location``: ``storage_options`` plus, for ``s3://``, the
    credentials, endpoint and region of the standard AWS environment variables (explicit
    options win). Hand the result to processes that may not see this environment."""
    options = dict(storage_options or {})
    if not str(location).startswith("s3://"):
        return options
    for option, names in _AWS_ENV:
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value and option not in options:
            options[option] = value
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    client_kwargs = dict(options.get("client_kwargs") or {})
    if region and "region_name" not in client_kwargs:
        options["client_kwargs"] = {**client_kwargs, "region_name": region}
    return options


class RangeTolerantStore(WrapperStore):
    """A read-only HTTP store that is correct on servers that ignore ``Range`` headers.

    Sharded arrays are read with byte ranges (the shard index, then inner chunks). Static
    servers such as Python's ``http.server`` answer a ranged GET with the whole object
    (status 200); fsspec passes that body through as if it were the range. The answer is
    longer than the range exactly when the range was ignored, so the range is cut out here."""

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if isinstance(byte_range, OffsetByteRequest):
            whole = await self._store.get(key, prototype)
            return None if whole is None else whole[byte_range.offset :]
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            return None
        if isinstance(byte_range, RangeByteRequest) and len(value) > byte_range.end - byte_range.start:
            return value[byte_range.start : byte_range.end]
        if isinstance(byte_range, SuffixByteRequest) and len(value) > byte_range.suffix:
            return value[len(value) - byte_range.suffix :]
        return value

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _endpoint(location: str, options: dict) -> str:
    if not location.startswith("s3://"):
        return location.split("/")[0] + "//" + location.split("/")[2]
    return (
        options.get("endpoint_url")
        or (options.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "AWS S3"
    )


def _bucket(location: str) -> str:
    return location.split("://", 1)[1].split("/", 1)[0]


def _missing_bucket(location: str, options: dict) -> RemoteStoreError:
    return RemoteStoreError(
        f"bucket {_bucket(location)!r} does not exist at {_endpoint(location, options)}; create it or fix the URL {location}"
    )


@contextlib.contextmanager
def remote_errors(location: str, storage_options: dict | None = None) -> Iterator[None]:
    """Turn the usual remote failures into one-line errors that name the fix."""
    try:
        yield
    except SoftlabelsError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified by name: botocore/aiohttp are optional imports
        names = {cls.__name__ for cls in type(exc).__mro__}
        options = storage_options or {}
        endpoint = _endpoint(location, options)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ConnectionRefusedError"}:
            raise RemoteStoreError(
                f"cannot reach {endpoint} for {location}; check the endpoint (--storage-option endpoint_url=... "
                "or AWS_ENDPOINT_URL) and the network"
            ) from None
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            raise RemoteStoreError(
                f"no credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass "
                "--storage-option key=... --storage-option secret=..., or anon=true for a public bucket)"
            ) from None
        if "PermissionError" in names:
            raise RemoteStoreError(f"access to {location} at {endpoint} was refused ({first}); check the credentials") from None
        if "FileNotFoundError" in names and "bucket" in first.lower():
            raise _missing_bucket(location, options) from None
        if "ClientResponseError" in names:
            raise RemoteStoreError(f"{location}: the server answered HTTP {getattr(exc, 'status', '?')} ({first})") from None
        raise


def _fsspec_store(location: str, *, read_only: bool, storage_options: dict | None) -> Store:
    try:
        store = zarr.storage.FsspecStore.from_url(location, read_only=read_only, storage_options=storage_options or {})
    except ImportError as exc:  # s3fs / aiohttp missing
        raise SoftlabelsError(f"cannot open {location}: {exc}; install the fsspec backend for this URL scheme") from None
    return RangeTolerantStore(store) if is_http(location) else store


def _fs_and_path(store: Store):
    inner = store._store if isinstance(store, WrapperStore) else store
    return inner.fs, inner.path


def open_zarr_store(location: str | os.PathLike, *, read_only: bool, storage_options: dict | None = None) -> Store:
    """A zarr Store for ``location``; read-only stores refuse every write.

    Remote stores are probed once here, so an unreachable endpoint, a missing bucket, missing
    credentials or an empty URL fail now with a one-line error rather than mid-read."""
    loc = str(location)
    if is_remote(loc):
        if is_http(loc) and not read_only:
            raise SoftlabelsError(f"cannot write {loc}: {HTTP_READ_ONLY}")
        loc = loc.rstrip("/")
        with remote_errors(loc, storage_options):
            store = _fsspec_store(loc, read_only=read_only, storage_options=storage_options)
            if read_only:
                if not sync(store.exists(METADATA_KEY)):
                    _raise_missing(loc, store, storage_options)
            elif loc.startswith("s3://"):
                _check_bucket(loc, store, storage_options)
        return store
    path = Path(loc)
    if not read_only:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SoftlabelsError(f"cannot create store directory {loc}: {exc.strerror}; choose a writable --out") from None
        if not os.access(path, os.W_OK):
            raise SoftlabelsError(f"store directory {loc} is not writable; choose a writable --out")
    return zarr.storage.LocalStore(path, read_only=read_only)


def _check_bucket(location: str, store: Store, storage_options: dict | None) -> None:
    fs, _ = _fs_and_path(store)
    bucket = _bucket(location)
    if sync(fs._exists(bucket)):
        return
    try:  # s3fs's probe hides why: ask once more and let remote_errors name the cause
        sync(fs._call_s3("head_bucket", Bucket=bucket))
    except FileNotFoundError:
        raise _missing_bucket(location, storage_options or {}) from None


def _raise_missing(location: str, store: Store, storage_options: dict | None) -> None:
    if location.startswith("s3://"):
        _check_bucket(location, store, storage_options)
    if is_http(location):
        fs, path = _fs_and_path(store)
        # fsspec's exists() is False for any failure: ask again, strictly, so that a server
        # error (HTTP 500, 403, ...) is reported as what it is, not as a missing store
        with contextlib.suppress(FileNotFoundError):
            sync(fs._exists(f"{path}/{METADATA_KEY}", strict=True))
        raise StoreNotFoundError(f"no store at {location} (HTTP 404 for {location}/{METADATA_KEY}); check the URL")
    raise StoreNotFoundError(f"no store at {location} (no {METADATA_KEY} there); check the URL")


def location_exists(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when something (anything, e.g. a partial copy) is already at ``location``."""
    loc = str(location)
    if not is_remote(loc):
        p = Path(loc)
        return p.exists() and (p.is_file() or any(p.iterdir()))
    loc = loc.rstrip("/")
    with remote_errors(loc, storage_options):
        store = _fsspec_store(loc, read_only=True, storage_options=storage_options)
        if is_http(loc):  # no listing over plain HTTP: a store is there when its metadata is
            return bool(sync(store.exists(METADATA_KEY)))
        fs, path = _fs_and_path(store)
        fs.invalidate_cache(path)
        return bool(sync(fs._exists(path)))


def remove_location(location: str | os.PathLike, storage_options: dict | None = None) -> None:
    loc = str(location)
    if not is_remote(loc):
        p = Path(loc)
        if p.is_symlink():
            raise SoftlabelsError(
                f"refusing to remove {loc}: it is a symbolic link (to {os.readlink(p)}); remove the link yourself or "
                "choose another location"
            )
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    if is_http(loc):
        raise SoftlabelsError(f"cannot remove {loc}: {HTTP_READ_ONLY}")
    loc = loc.rstrip("/")
    with remote_errors(loc, storage_options):
        fs, path = _fs_and_path(_fsspec_store(loc, read_only=False, storage_options=storage_options))
        with contextlib.suppress(FileNotFoundError):
            sync(fs._rm(path, recursive=True))
        fs.invalidate_cache(path)


def store_keys(store: Store) -> list[str]:
    """Every object key of a store: listed where the backend can list, else (plain HTTP)
    derived from the schema in the store's own metadata."""
    inner = store
    while isinstance(inner, WrapperStore) and not isinstance(inner, RangeTolerantStore):
        inner = inner._store  # e.g. the reader's guard around an HTTP store
    if isinstance(inner, RangeTolerantStore):
        raw = sync(store.get(METADATA_KEY, default_buffer_prototype()))
        meta = json.loads(raw.to_bytes())["attributes"][fmt.ATTRS_KEY]
        return object_keys(fmt.StoreSchema.from_dict(meta["schema"]))

    async def _listed() -> list[str]:
        return sorted([key async for key in store.list()])

    return sync(_listed())


def bytes_on_disk(store: Store) -> int:
    """Sum of stored object sizes (compressed bytes, all arrays and metadata)."""

    async def _total(keys: list[str]) -> int:
        total = 0
        for key in keys:
            total += int(await store.getsize(key))
        return total

    return int(sync(_total(store_keys(store))))
