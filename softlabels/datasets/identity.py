"""How a dataset at hand differs from the one a store records, by *kind*, so that a user can allow
exactly one kind of difference (``softlabels train --allow preprocessing``) and no other.

Kinds: ``spec`` (another dataset, other generator parameters, another split), ``preprocessing``
(resize, crop, normalisation, input shape), ``labels`` (labels in another order or with other
values), ``files`` (missing, extra or changed files, other inputs) and ``classes`` (class folders
renamed, added or removed), and ``teacher`` (stores of different teachers trained together). A
different sample or class count is never allowed: the store's rows or
targets would not line up.

The local root of a path dataset is not part of its identity: the same files at another path are
the same data (their manifest, :mod:`softlabels.datasets.manifest`, says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from softlabels.datasets.manifest import manifest_differences
from softlabels.datasets.spec import spec_identity, split_name
from softlabels.errors import SpecError

__all__ = ["KINDS", "identity_differences", "parse_allow"]

KINDS = ("spec", "preprocessing", "labels", "files", "classes", "teacher")

Difference = tuple[str, Any, Any, str, str]  # (field, store value, this run's value, kind, note)


def parse_allow(values: Iterable[str] | None) -> frozenset[str]:
    """``["preprocessing", "files,classes"]`` -> the set of allowed kinds; one-line error otherwise."""
    kinds = set()
    for value in values or ():
        for kind in filter(None, (v.strip().lower() for v in value.split(","))):
            if kind not in KINDS:
                raise SpecError(f"--allow {kind}: unknown kind of difference; choose from {', '.join(KINDS)}")
            kinds.add(kind)
    return frozenset(kinds)


def _leaves(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _leaves(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [(path, a, b)]


def _spec_kind(stored: str, here: str) -> str | None:
    """None when two canonical specs name the same data; else the kind of their difference."""
    a, b = spec_identity(stored), spec_identity(here)
    if a == b:
        return None
    path_dataset = a != stored or b != here  # the root was dropped: its query is the preprocessing
    if path_dataset and split_name(a)[0] == split_name(b)[0]:
        return "preprocessing"
    return "spec"


def identity_differences(recorded: Mapping[str, Any], here: Mapping[str, Any], *, same_rows: bool) -> list[Difference]:
    """Differences between a store's ``schema.dataset`` and ``DatasetInfo.to_dict()`` of the
    dataset at hand, labels aside. Fields the store did not record are not compared; contents
    only when the sample counts agree (``same_rows``)."""
    out: list[Difference] = []
    if recorded.get("spec") is not None:
        kind = _spec_kind(str(recorded["spec"]), str(here["spec"]))
        if kind:
            out.append(("spec", recorded["spec"], here["spec"], kind, ""))
    if recorded.get("split") is not None and recorded["split"] != here["split"]:
        out.append(("split", recorded["split"], here["split"], "spec", ""))
    if recorded.get("input_shape") is not None and list(recorded["input_shape"]) != list(here["input_shape"]):
        out.append(("input_shape", recorded["input_shape"], here["input_shape"], "preprocessing", ""))
    if recorded.get("preprocessing") is not None:
        stored_pre = dict(recorded["preprocessing"])
        if str(stored_pre.get("folder", "")).startswith("/"):  # stores before format 1.2: an absolute path
            stored_pre.pop("folder")
        here_pre = {k: v for k, v in dict(here.get("preprocessing") or {}).items() if k in stored_pre or k != "folder"}
        out += [(path, a, b, "preprocessing", "") for path, a, b in _leaves(stored_pre, here_pre, "preprocessing")]
    if not same_rows:
        return out
    stored_manifest, here_manifest = recorded.get("manifest"), here.get("manifest")
    if stored_manifest and here_manifest:
        for kind, text in manifest_differences(stored_manifest, here_manifest):
            out.append(("manifest", None, None, kind, text))
        return out
    content, now = recorded.get("content_sha256"), here.get("content_sha256")
    if content is not None and now is not None and content != now:
        out.append(("content_sha256", content, now, "files", "inputs differ"))
    return out
