"""Identity of a file dataset by content, not by path: a *manifest* of an image folder split.

A store records the manifest of the data it was dumped from, so it opens against the same files
at any path (another machine, another team), and a difference is reported by kind:

``{"version": 1, "files": N, "classes": [names in label order] | null, "class_files": [files per class] | null,
   "names_sha256": ..., "sizes_sha256": ..., "content_sha256": ...}``

* a file's *key* is ``<label>/<path inside its class folder>`` (``<path inside the split folder>`` for
  the unlabelled ``transfer`` split), in dataset order, so renaming a class folder changes
  ``classes`` only;
* ``names_sha256`` = sha256 of the keys, one per line; ``sizes_sha256`` of ``key<TAB>size`` lines;
  ``content_sha256`` of the files' own sha256 (hex), one per line, in dataset order.

File digests are computed in parallel threads and cached beside the data, in
``<split folder>/.softlabels-manifest.json`` (``{key: [size, mtime_ns, sha256]}``; a file whose
size or mtime changed is hashed again), or under ``~/.cache/softlabels/`` when the folder is not
writable. ImageFolder and the transfer split only read image extensions, so the cache file is
never taken for data.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["MANIFEST_VERSION", "CACHE_NAME", "folder_manifest", "manifest_differences"]

MANIFEST_VERSION = 1
CACHE_NAME = ".softlabels-manifest.json"
_CHUNK = 1 << 20


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _lines_sha256(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


def _cache_paths(folder: str) -> list[str]:
    home = os.path.join(os.path.expanduser("~"), ".cache", "softlabels")
    return [os.path.join(folder, CACHE_NAME),
            os.path.join(home, f"manifest-{hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:24]}.json")]


def _read_cache(folder: str) -> dict[str, list]:
    for path in _cache_paths(folder):
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION:
                return dict(data.get("files", {}))
        except (OSError, ValueError):
            continue
    return {}


def _write_cache(folder: str, files: dict[str, list]) -> None:
    body = json.dumps({"version": MANIFEST_VERSION, "files": files}, separators=(",", ":"))
    for path in _cache_paths(folder):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, path)
            return
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def folder_manifest(folder: str, paths: Sequence[str], labels: Sequence[int] | None,
                    classes: Sequence[str] | None, *, threads: int | None = None) -> dict[str, Any]:
    """The manifest of the files ``paths`` (dataset order) under ``folder``; ``labels`` and
    ``classes`` for labelled splits (``classes[label]`` is the class folder's name)."""
    folder = os.path.abspath(folder)
    keys = []
    for i, path in enumerate(paths):
        if labels is not None and classes is not None:
            inside = os.path.relpath(path, os.path.join(folder, classes[labels[i]]))
            keys.append(f"{labels[i]}/{inside}")
        else:
            keys.append(os.path.relpath(path, folder))
    keys = [k.replace(os.sep, "/") for k in keys]
    stats = [os.stat(p) for p in paths]
    cache = _read_cache(folder)
    digests: list[str | None] = []
    for key, st in zip(keys, stats):
        hit = cache.get(key)
        digests.append(hit[2] if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns else None)
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo:
        workers = threads or min(16, 2 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL
            for i, digest in zip(todo, pool.map(_sha256_file, [paths[i] for i in todo])):
                digests[i] = digest
        _write_cache(folder, {k: [st.st_size, st.st_mtime_ns, d] for k, st, d in zip(keys, stats, digests)})
    class_files = None
    if labels is not None and classes is not None:
        class_files = [0] * len(classes)
        for label in labels:
            class_files[label] += 1
    return {
        "version": MANIFEST_VERSION,
        "files": len(keys),
        "classes": None if classes is None else list(classes),
        "class_files": class_files,
        "names_sha256": _lines_sha256(keys),
        "sizes_sha256": _lines_sha256([f"{k}\t{st.st_size}" for k, st in zip(keys, stats)]),
        "content_sha256": _lines_sha256(digests),  # type: ignore[arg-type]
    }


def manifest_differences(stored: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(kind, text), ...]``: how the files at hand differ from a recorded manifest, by kind:
    ``classes`` (class folders renamed, added or removed) and ``files`` (missing or extra files,
    or files with other content)."""
    out: list[tuple[str, str]] = []
    a, b = stored.get("classes"), here.get("classes")
    if a is not None and b is not None and a != b:
        renamed = [f"'{x}' -> '{y}'" for x, y in zip(a, b) if x != y]
        text = f"class folders renamed: {', '.join(renamed)}" if renamed and len(a) == len(b) else \
            f"class folders {a} in the store, {b} here"
        out.append(("classes", text))
    if stored.get("names_sha256") != here.get("names_sha256"):
        counts_a, counts_b = stored.get("class_files"), here.get("class_files")
        detail = ""
        if counts_a and counts_b and len(counts_a) == len(counts_b):
            names = b or a or []
            per_class = [f"{names[i] if i < len(names) else i}: {x} in the store, {y} here"
                         for i, (x, y) in enumerate(zip(counts_a, counts_b)) if x != y]
            detail = f" ({'; '.join(per_class)})" if per_class else " (same counts, other file names)"
        out.append(("files", f"missing or extra files: {stored.get('files')} files in the store, "
                             f"{here.get('files')} here{detail}"))
    elif stored.get("content_sha256") != here.get("content_sha256"):
        what = "other sizes and content" if stored.get("sizes_sha256") != here.get("sizes_sha256") else "other content"
        out.append(("files", f"changed files: the same {here.get('files')} file names with {what} "
                             f"(content_sha256 {str(stored.get('content_sha256'))[:12]} in the store, "
                             f"{str(here.get('content_sha256'))[:12]} here)"))
    return out
