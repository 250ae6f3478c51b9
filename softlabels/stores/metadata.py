"""Reading and validating the store's metadata (the JSON under the group attribute
``softlabels``), the typed view of it that readers expose, and the digests that make every
metadata document tamper-evident."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softlabels.errors import NotAStoreError, UnsupportedFormatError
from softlabels.stores import format as fmt
from softlabels.stores.location import store_keys


def labels_fingerprint(labels: np.ndarray) -> str:
    """sha256 over N and the labels as little-endian int64, in dataset order."""
    arr = np.ascontiguousarray(np.asarray(labels, dtype="<i8"))
    h = hashlib.sha256(f"softlabels-labels:{arr.shape[0]}:".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def read_metadata(group: zarr.Group, location: str, *, check_version: bool = True) -> dict[str, Any]:
    """The raw metadata dict; clear errors for foreign groups and newer format versions."""
    meta = group.attrs.get(fmt.ATTRS_KEY)
    if not isinstance(meta, dict) or meta.get("format") != fmt.FORMAT_NAME or "schema" not in meta:
        raise NotAStoreError(
            f"{location} is a Zarr group but not a softlabels store (no '{fmt.ATTRS_KEY}' metadata); "
            "point at a store written by `softlabels dump`"
        )
    version = str(meta.get("format_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise NotAStoreError(f"{location} has an unreadable format_version {version!r}") from None
    if check_version and major > fmt.FORMAT_MAJOR:
        raise UnsupportedFormatError(
            f"{location} uses softlabels store format {version}, newer than this reader's "
            f"{fmt.FORMAT_VERSION}; upgrade softlabels (pip install -U softlabels)"
        )
    needs = meta.get(fmt.MIN_READER_KEY)
    if check_version and needs is not None and _version(needs) > _version(fmt.FORMAT_VERSION):
        codec = (meta.get("schema") or {}).get("codec") or {}
        what = f" (target codec '{codec.get('name')}')" if codec else ""
        raise UnsupportedFormatError(
            f"{location} uses softlabels store format {version}{what}, which needs a reader of format {needs} or newer; "
            f"this reader is {fmt.FORMAT_VERSION}: upgrade softlabels (pip install -U softlabels)"
        )
    return meta


def _version(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split("."))
    except ValueError:
        return (1 << 30,)  # unreadable: newer than anything this reader knows


@dataclass(frozen=True)
class StoreMetadata:
    """Typed, read-only view of a store's metadata."""

    raw: dict[str, Any]
    schema: fmt.StoreSchema

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> StoreMetadata:
        """Typed view; a value of the wrong type raises ``ValueError`` naming the key (the
        metadata is untrusted: no reader may crash on it later)."""
        for key, kinds in (("status", str), ("summary", (dict, type(None))), ("format_version", str)):
            if not isinstance(raw.get(key), kinds):
                raise ValueError(f"'{key}' has the wrong type ({type(raw.get(key)).__name__})")
        if raw.get("summary") is not None:
            _check_summary(raw["summary"])
        return cls(raw=raw, schema=fmt.StoreSchema.from_dict(raw["schema"]))

    @property
    def status(self) -> str:
        return str(self.raw.get("status"))

    @property
    def format_version(self) -> str:
        return str(self.raw.get("format_version"))

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.raw.get("summary")

    @property
    def teacher(self) -> dict[str, Any]:
        return dict(self.schema.teacher)

    @property
    def dataset(self) -> dict[str, Any]:
        return dict(self.schema.dataset)


def _check_summary(summary: dict[str, Any], where: str = "summary") -> None:
    number = (int, float)
    masses = summary.get("topk_mass", {})
    if not isinstance(masses, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("mean"), number) and isinstance(m.get("min"), number)
        for m in masses.values()
    ):
        raise ValueError(f"'{where}.topk_mass' is not a mapping of {{mean, min}} numbers")
    for key in ("teacher_top1_accuracy", "label_in_topk"):
        if not isinstance(summary.get(key), (*number, type(None))):
            raise ValueError(f"'{where}.{key}' is not a number")
    if summary.get("view0") is not None:
        if not isinstance(summary["view0"], dict):
            raise ValueError(f"'{where}.view0' is not a mapping")
        _check_summary(summary["view0"], f"{where}.view0")


# -- metadata digests ------------------------------------------------------------------
# Chunks carry crc32c and units carry sha256, but the JSON documents (zarr.json of the group,
# of every sub-group and array) carry nothing of their own: a flipped byte in a codec setting or
# in the recorded dataset identity could go unnoticed. At finalize the writer records the sha256
# of every zarr.json as canonical JSON (sorted keys, no whitespace) under ``metadata_sha256``;
# the root document is hashed without that key. Canonical JSON survives a re-serialisation
# (e.g. a copy through another Zarr library) and still changes with every value.
METADATA_DIGEST_KEY = "metadata_sha256"
METADATA_FILE = "zarr.json"
STORE_DIGEST_KEY = "store_digest"  # format 1.2, softlabels.stores.digest


def canonical_sha256(document: Any) -> str:
    """sha256 of a JSON document as canonical JSON (sorted keys, no whitespace, ASCII)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_metadata_documents(zstore: Any) -> tuple[dict[str, Any], list[str]]:
    """Every ``zarr.json`` of the store, parsed: ``({key: document}, [problems])``; a document
    that is not valid JSON is a problem naming its key."""
    try:  # plain HTTP cannot list: store_keys derives the keys from the root's schema instead
        keys = sorted(k for k in store_keys(zstore) if k == METADATA_FILE or k.endswith("/" + METADATA_FILE))
    except (ValueError, KeyError, TypeError, AttributeError):  # that root document is itself damaged: it alone is named
        keys = [METADATA_FILE]
    docs: dict[str, Any] = {}
    problems: list[str] = []
    for key in keys:
        buf = sync(zstore.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            problems.append(f"metadata {key}: missing")
            continue
        try:
            docs[key] = json.loads(buf.to_bytes())
        except ValueError as exc:
            problems.append(f"metadata {key}: not valid JSON ({exc})")
    return docs, problems


def _root_without_digest(root: Any) -> Any:
    doc = copy.deepcopy(root)
    meta = doc.get("attributes", {}).get(fmt.ATTRS_KEY) if isinstance(doc, dict) else None
    if isinstance(meta, dict):  # the digests are computed over everything else (FORMAT.md §6)
        meta.pop(METADATA_DIGEST_KEY, None)
        meta.pop(STORE_DIGEST_KEY, None)
    return doc


def metadata_digests(docs: dict[str, Any], root_meta: dict[str, Any] | None = None) -> dict[str, str]:
    """``{key: sha256}`` of every metadata document; ``root_meta`` replaces the root's
    softlabels attributes (the writer hashes what it is about to write)."""
    out = {}
    for key, doc in docs.items():
        if key == METADATA_FILE:
            doc = dict(doc)
            if root_meta is not None:
                attrs = dict(doc.get("attributes") or {})
                attrs[fmt.ATTRS_KEY] = json.loads(json.dumps(root_meta))
                doc["attributes"] = attrs
            doc = _root_without_digest(doc)
        out[key] = canonical_sha256(doc)
    return out


def check_metadata_documents(zstore: Any) -> list[str]:
    """Problems with the store's JSON documents, each naming the file: not valid JSON, no
    softlabels metadata, or a document whose canonical sha256 differs from the one recorded at
    finalize (missing, changed or added after finalize)."""
    docs, problems = read_metadata_documents(zstore)
    root = docs.get(METADATA_FILE)
    if root is None:
        if not any(p.startswith(f"metadata {METADATA_FILE}:") for p in problems):
            problems.append(f"metadata {METADATA_FILE}: missing")
        return problems
    meta = root.get("attributes", {}).get(fmt.ATTRS_KEY) if isinstance(root, dict) else None
    if not isinstance(meta, dict):
        return [*problems, f"metadata {METADATA_FILE}: has no '{fmt.ATTRS_KEY}' attributes"]
    recorded = meta.get(METADATA_DIGEST_KEY)
    if recorded is None:
        if meta.get("status") == "complete" and _minor_at_least(meta.get("format_version"), 1, 1):
            problems.append(
                f"metadata {METADATA_FILE}: a complete format-{meta.get('format_version')} store must record "
                f"'{METADATA_DIGEST_KEY}' but has none"
            )
        return problems
    if not isinstance(recorded, dict):
        return [*problems, f"metadata {METADATA_FILE}: '{METADATA_DIGEST_KEY}' is not a mapping"]
    actual = metadata_digests(docs)
    for key in sorted(set(recorded) | set(actual)):
        if key not in actual:
            if not any(p.startswith(f"metadata {key}:") for p in problems):
                problems.append(f"metadata {key}: missing")
        elif key not in recorded:
            problems.append(
                f"metadata {key}: not recorded in {METADATA_FILE} {METADATA_DIGEST_KEY} (added after finalize)"
            )
        elif recorded[key] != actual[key]:
            problems.append(
                f"metadata {key}: content differs from the sha256 recorded in {METADATA_FILE} at finalize "
                "(one of the two was modified)"
            )
    return problems


def _minor_at_least(version: Any, major: int, minor: int) -> bool:
    try:
        a, b = (int(x) for x in str(version).split(".")[:2])
    except ValueError:
        return True  # unreadable version: the digest is expected
    return (a, b) >= (major, minor)
