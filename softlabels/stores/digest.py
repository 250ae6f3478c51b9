"""The store digest: one sha256 that pins a store's whole content, as an image digest pins a
container image (docs/FORMAT.md §6).

It is a two-level Merkle-style root. The leaves are what the store already records: the sha256
of every metadata document (``metadata_sha256``, which covers the root document with the
schema, teacher, dataset and run id) and the per-array sha256 of every unit (``units/sha256``).
Swapping arrays or units between two stores, or editing any metadata, changes the digest even
when every checksum and unit digest still holds. ``verify`` recomputes it from the content it
has checked and compares it with the one recorded at finalize; ``--expect-digest`` compares it
with the one a reviewer pinned.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

import numpy as np

from softlabels.errors import SoftlabelsError

_DOMAIN = b"softlabels-store-digest:1\n"
_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


class DigestMismatchError(SoftlabelsError):
    """The store is not the one pinned with ``--expect-digest``."""

    exit_code = 1


def unit_digest(data: np.ndarray) -> bytes:
    """sha256 of an array's bytes as stored: C order, little-endian (a leaf of ``units/sha256``)."""
    arr = np.ascontiguousarray(data)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.tobytes()).digest()


def store_digest(metadata_sha256: Mapping[str, str], unit_sha256: np.ndarray) -> str:
    """``sha256:<hex>`` over the metadata root and the units root.

    metadata root = sha256 of ``metadata_sha256`` as canonical JSON (sorted keys, no spaces);
    unit leaf u   = sha256 of ``units/sha256[u]`` (its ``A × 32`` bytes, arrays in
                    ``per_sample_arrays`` order); units root = sha256 of the leaves concatenated
                    in unit order;
    digest        = sha256(``b"softlabels-store-digest:1\\n"`` + metadata root + units root).
    """
    text = json.dumps(dict(metadata_sha256), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    units = hashlib.sha256()
    rows = np.ascontiguousarray(np.asarray(unit_sha256, dtype=np.uint8))
    for row in rows:
        units.update(hashlib.sha256(row.tobytes()).digest())
    h = hashlib.sha256(_DOMAIN)
    h.update(hashlib.sha256(text.encode()).digest())
    h.update(units.digest())
    return "sha256:" + h.hexdigest()


def parse_expected(text: str | None) -> str | None:
    """Validate a ``--expect-digest`` value (``sha256:`` and 64 lowercase hex digits)."""
    if text is None:
        return None
    value = text.strip().lower()
    if not _PATTERN.fullmatch(value):
        raise SoftlabelsError(
            f"--expect-digest must look like sha256:<64 hex digits> (as `softlabels info` prints it), got {text!r}"
        )
    return value


def check_expected(location: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise DigestMismatchError(
            f"{location} has store digest {actual}, not the expected {expected}; it is not the store that was "
            "pinned (different content, or changed since); check the location or pin the new digest after review"
        )
