"""Reading a store marked complete as untrusted input: a missing chunk is damage, never zarr's
fill value, and a failed read is one line that names the array without quoting its bytes."""

from __future__ import annotations

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from softlabels.errors import DamagedStoreError, SoftlabelsError


class CompleteStoreGuard(WrapperStore):
    """Reads of a store marked complete: a missing chunk (or shard) of one of its arrays is
    damage, never zarr's fill value. Every chunk of a complete store is written, even when it
    equals the fill value (FORMAT.md §4), so a missing one was lost or deleted."""

    arrays: tuple[str, ...] = ()
    location: str = ""
    rows_per_shard: int = 1

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            self._missing(key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None:
                self._missing(key)
        return values

    def _missing(self, key: str) -> None:
        name, sep, index = key.partition("/c/")
        if not sep or name not in self.arrays:
            return
        first = index.split("/")[0]
        rows = ""
        if first.isdigit() and name not in ("units/complete", "units/sha256"):
            start = int(first) * self.rows_per_shard
            rows = f" (rows {start}..{start + self.rows_per_shard - 1})"
        raise DamagedStoreError(
            f"{self.location} is damaged: chunk {key} of array {name} is missing{rows}, yet the store is marked "
            f"complete; run `softlabels verify {self.location}`"
        )


class MissingArrayError(DamagedStoreError, KeyError):
    """An array the schema names is not in the store (being created, or lost)."""

    __str__ = Exception.__str__


def read_error(location: str, name: str, rows: str, exc: BaseException) -> SoftlabelsError:
    """One line for a failure to read an array, without echoing the exception's text (a chunk
    may be a link to another file, and a decoder may quote the bytes it read)."""
    if isinstance(exc, SoftlabelsError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ClientError", "ConnectionError", "TimeoutError", "BotoCoreError", "ClientResponseError"} or (
        "OSError" in names and "FileNotFoundError" not in names
    ):
        return SoftlabelsError(
            f"reading array {name} (rows {rows}) of {location} failed: {type(exc).__name__} "
            f"({' '.join(str(exc).split())[:120]}); check the network or the disk and retry"
        )
    text = str(exc).lower()
    what = "fails its checksum" if "checksum" in text or "crc" in text else f"cannot be decoded ({type(exc).__name__})"
    return DamagedStoreError(f"{location} is damaged: array {name} {what} at rows {rows}; run `softlabels verify {location}`")
