"""Building and tampering with stores as an adversary would (issue 18 tests).

Kept free of the 1.2-only modules where it can, so the same tests run (and fail) against the
code from before the fix."""

import hashlib
import json
import shutil

import numpy as np
import zarr

from softlabels.datasets import load_dataset
from softlabels.data import store_dataset_metadata
from softlabels.stores.from_logits import write_store_from_logits

PER_SAMPLE = ["topk_values", "topk_indices", "logsumexp", "label_logit", "labels", "features/penultimate"]


def digits_store(path, *, seed=0, teacher="test:teacher-a"):
    """A complete store of the digits train split (1437 rows, 6 units of 256) from random
    teacher-like logits; ``seed`` makes a different teacher."""
    _, info = load_dataset("digits", "train")
    g = np.random.default_rng(seed)
    logits = g.normal(0, 2.0, (info.num_samples, 10)).astype(np.float32)
    logits[np.arange(info.num_samples), info.labels] += 5.0
    feats = g.normal(size=(info.num_samples, 4)).astype(np.float32)
    write_store_from_logits(
        path, logits, k=3, temperatures=(1.0, 4.0), labels=info.labels, features={"penultimate": feats},
        teacher={"spec": teacher}, dataset=store_dataset_metadata(info), rows_per_shard=256, rows_per_chunk=128,
    )
    return path


def reseal(path, unit=None):
    """Do what a forger does after editing arrays: re-record the unit digests (of ``unit``, or of
    every unit) and every metadata digest, as the writer would at finalize."""
    from softlabels.stores.metadata import metadata_digests, read_metadata_documents
    from softlabels.stores.writer import StoreWriter, unit_digest

    writer = StoreWriter(path)
    names = [s.name for s in writer.schema.per_sample_arrays()]
    units = range(writer.schema.num_units) if unit is None else [unit]
    for u in units:
        start, stop = writer.schema.unit_range(u)
        rows = np.stack([np.frombuffer(unit_digest(writer._array(n)[start:stop]), dtype=np.uint8) for n in names])
        writer._array("units/sha256")[u] = rows
    meta = dict(writer.meta)
    meta.pop("metadata_sha256", None)
    meta.pop("store_digest", None)
    docs, _ = read_metadata_documents(writer._store)
    meta["metadata_sha256"] = metadata_digests(docs, root_meta=meta)
    try:
        from softlabels.stores.digest import store_digest
    except ImportError:  # before format 1.2 there is no store digest to forge
        pass
    else:
        meta["store_digest"] = store_digest(meta["metadata_sha256"], writer._array("units/sha256")[...])
    writer._group.attrs["softlabels"] = meta


def edit_unit(path, unit, edit):
    """``edit({name: rows})`` changes one unit's rows in place; the store is then resealed, so only
    a check of the values' meaning can tell."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    meta = group.attrs["softlabels"]["schema"]
    start = unit * meta["rows_per_shard"]
    stop = min(start + meta["rows_per_shard"], meta["num_samples"])
    with zarr.config.set({"array.write_empty_chunks": True}):
        arrays = {name: group[name][start:stop] for name in PER_SAMPLE}
        edit(arrays)
        for name, rows in arrays.items():
            group[name][start:stop] = rows
    reseal(path, unit)


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def root_meta(path):
    return json.loads((path / "zarr.json").read_text())["attributes"]["softlabels"]
