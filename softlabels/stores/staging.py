"""Helpers of the staging copy (softlabels.stores.copy): a view of a store whose root
``zarr.json`` is held in memory, and the symbolic links of a local store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from softlabels.stores.keys import METADATA_KEY


class RootOverlay(WrapperStore):
    """``store`` as if its root ``zarr.json`` were ``root``: a staging copy is verified before
    its root (the commit marker) is written, so an interrupted copy is never a store."""

    def __init__(self, store: Store, root: Buffer) -> None:
        super().__init__(store)
        self._root = root

    def _with_store(self, store: Store) -> RootOverlay:
        return type(self)(store, self._root)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        if key == METADATA_KEY:
            return self._root if byte_range is None else await super().get(key, prototype, byte_range)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return key == METADATA_KEY or await self._store.exists(key)

    async def getsize(self, key: str) -> int:
        return len(self._root) if key == METADATA_KEY else await self._store.getsize(key)

    async def list(self) -> AsyncIterator[str]:
        yield METADATA_KEY
        async for key in self._store.list():
            if key != METADATA_KEY:
                yield key


def local_symlinks(path: str | os.PathLike) -> list[str]:
    """Every symbolic link (to a file or a directory) inside a local store, relative to it;
    links are not followed."""
    found = []
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            if os.path.islink(full):
                found.append(os.path.relpath(full, path))
    return found
