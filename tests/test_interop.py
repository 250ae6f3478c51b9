"""Compatibility of a shared store: the format version rule (newer MAJOR refused in one line, newer
MINOR read, unknown optional keys and arrays ignored) and an independent Zarr v3 implementation
(tensorstore) reading every array of a real `softlabels dump` store to the same values."""

import importlib.metadata
import json

import numpy as np
import pytest
import zarr

from softlabels.stores import format as fmt
from softlabels.stores.metadata import METADATA_DIGEST_KEY, metadata_digests, read_metadata_documents
from softlabels.stores.reader import open_store
from softlabels.stores.digest import store_digest
from softlabels.stores.verify import verify_store


def _rewrite_as_written_by(store_path, version, extra_key=None, extra_array=None):
    """Make ``store_path`` what a future writer of format ``version`` could have written: its
    format_version, optionally an unknown metadata key and an unknown array, and a consistent
    metadata_sha256 and store_digest (a real writer of that version records its own)."""
    root = store_path / "zarr.json"
    doc = json.loads(root.read_text())
    meta = doc["attributes"][fmt.ATTRS_KEY]
    meta["format_version"] = version
    if extra_key:
        meta[extra_key] = {"anything": [1, 2, 3]}
    root.write_text(json.dumps(doc))
    if extra_array:
        arr = zarr.create_array(str(store_path / extra_array), shape=(4,), dtype="float32", zarr_format=3)
        arr[:] = np.arange(4, dtype="float32")
    zstore = zarr.storage.LocalStore(store_path)
    docs, problems = read_metadata_documents(zstore)
    assert not problems
    meta[METADATA_DIGEST_KEY] = metadata_digests(docs, root_meta=meta)
    meta["store_digest"] = store_digest(meta[METADATA_DIGEST_KEY], zarr.open_array(str(store_path / "units/sha256"))[...])
    doc = json.loads(root.read_text())
    doc["attributes"][fmt.ATTRS_KEY] = meta
    root.write_text(json.dumps(doc, indent=2))


@pytest.mark.parametrize("command", ["info", "verify"])
def test_newer_major_version_is_refused_in_one_line(small_store, cli, command):
    _rewrite_as_written_by(small_store, "2.0")
    code, out, err = cli(command, small_store)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: {small_store} uses softlabels store format 2.0, newer than this reader's {fmt.FORMAT_VERSION}; "
        "upgrade softlabels (pip install -U softlabels)"
    ]


def test_newer_minor_version_with_unknown_additions_is_read(small_store, cli):
    before = open_store(small_store).read(np.arange(3000))
    _rewrite_as_written_by(small_store, "1.9", extra_key="future_metadata", extra_array="future/extra")
    store = open_store(small_store)
    assert store.meta.format_version == "1.9"
    after = store.read(np.arange(3000))
    assert all(np.array_equal(before[name], after[name]) for name in before)
    code, out, err = cli("info", small_store, "--json")
    assert code == 0, err
    assert json.loads(out)["format_version"] == "1.9"
    code, out, err = cli("verify", small_store)
    assert code == 0, err
    assert "12 units verified" in out


def test_format_version_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    assert doc.splitlines()[0] == f"# softlabels store format — version {fmt.FORMAT_VERSION}"
    version = importlib.metadata.version("tensorstore")
    assert f"tensorstore {version}" in doc


@pytest.fixture(scope="module")
def dumped_store(ray_session, tmp_path_factory, mnist1d_teacher):
    """A real `softlabels dump` output: 480 mnist1d rows in 2 sharded units, features, classifier."""
    from softlabels.pipelines.dump import run_dump
    from softlabels.pipelines.predictor import DumpConfig

    out = tmp_path_factory.mktemp("interop") / "dumped.zarr"
    config = DumpConfig(teacher="builtin:cnn", weights=str(mnist1d_teacher), dataset="mnist1d:num_samples=600",
                        out=str(out), k=5, temperatures=(1.0, 4.0), batch_size=128, threads_per_worker=1)
    run_dump(config, workers=1)
    return out


def test_tensorstore_reads_every_array_of_a_dumped_store(dumped_store):
    """tensorstore's own zarr3 driver (sharding_indexed, blosc, crc32c in C++) decodes every
    array to exactly the values softlabels' reader returns."""
    ts = pytest.importorskip("tensorstore")
    store = open_store(dumped_store)
    specs = store.schema.all_arrays()
    names = {s.name for s in specs}
    assert {"features/penultimate", "teacher/classifier_weight", "teacher/classifier_bias", "units/complete",
            "units/sha256", "labels", "label_logit"} <= names
    sharded = [s.name for s in specs if s.shards is not None]
    assert len(sharded) == 6 and store.schema.num_units == 2
    for spec in specs:
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(dumped_store / spec.name)}},
                      read=True).result()
        theirs = arr.read().result()
        ours = store.array(spec.name)[...]
        assert theirs.dtype == np.dtype(spec.dtype) and theirs.shape == spec.shape, spec.name
        np.testing.assert_array_equal(theirs, ours, err_msg=spec.name)
        if spec.per_sample:
            np.testing.assert_array_equal(store.read(np.arange(spec.shape[0]), [spec.name])[spec.name], theirs)
        codecs = json.loads((dumped_store / spec.name / "zarr.json").read_text())["codecs"]
        if spec.shards is not None:
            assert codecs[0]["name"] == "sharding_indexed"
            inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
        else:
            inner = [c["name"] for c in codecs]
        assert inner == ["bytes", "blosc", "crc32c"], (spec.name, inner)
    assert verify_store(dumped_store).ok
