"""Every object key of a complete store, derived from its schema alone.

Plain HTTP servers cannot list a directory, so reading, sizing and copying an ``http(s)://``
store must know its keys without listing. The schema names every array and fixes its chunk
grid; zarr's default chunk-key encoding (``<array>/c/<i>/<j>...``) does the rest.
"""

from __future__ import annotations

import itertools

from softlabels.stores import format as fmt

METADATA_KEY = "zarr.json"


def array_chunk_keys(spec: fmt.ArraySpec) -> list[str]:
    """Keys of every stored chunk (a shard, when the array is sharded) of one array."""
    outer = spec.shards or spec.chunks
    grid = [range(-(-size // step)) for size, step in zip(spec.shape, outer)]
    return [f"{spec.name}/c/" + "/".join(map(str, idx)) for idx in itertools.product(*grid)]


def metadata_keys(schema: fmt.StoreSchema) -> list[str]:
    """The ``zarr.json`` of the root group, of every intermediate group and of every array."""
    groups: set[str] = set()
    arrays = []
    for spec in schema.all_arrays():
        parts = spec.name.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
        arrays.append(spec.name)
    return [METADATA_KEY] + [f"{g}/{METADATA_KEY}" for g in sorted(groups)] + [f"{a}/{METADATA_KEY}" for a in arrays]


def object_keys(schema: fmt.StoreSchema) -> list[str]:
    """All keys of a complete store: metadata first (root ``zarr.json`` leading), then chunks."""
    chunks = [key for spec in schema.all_arrays() for key in array_chunk_keys(spec)]
    return metadata_keys(schema) + chunks


def unsafe_key(key: str) -> bool:
    """True for a key that is not a plain relative path: absolute, empty, with ``.``, ``..`` or
    empty segments, or with a backslash or NUL. Such a key could point outside a local copy."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return True
    return any(part in ("", ".", "..") for part in key.split("/"))


def defined_keys(schema: fmt.StoreSchema) -> set[str]:
    """Every key the format defines for this schema (a complete store holds exactly these)."""
    return set(object_keys(schema))
