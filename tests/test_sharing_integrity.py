"""Integrity of a shared store: `softlabels verify` names every flipped byte, truncated or missing
chunk and damaged metadata document; `train` refuses a store that is still being written; a store
opened for reading cannot be changed through softlabels' reader."""

import json

import numpy as np
import pytest
import zarr

from softlabels.stores import format as fmt
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.stores.reader import open_store
from softlabels.stores.verify import verify_store


@pytest.fixture
def tiny_store(tmp_path):
    """Every kind of file a store has (sharded per-sample arrays with features, teacher
    classifier and bias, units/*, group and array zarr.json), in 2 units of 256 rows."""
    g = np.random.default_rng(0)
    n, c = 512, 6
    labels = g.integers(0, c, n)
    logits = g.normal(0, 2, (n, c)).astype(np.float32)
    logits[np.arange(n), labels] += 3
    write_store_from_logits(
        tmp_path / "t.zarr", logits, k=3, temperatures=(1, 4), labels=labels,
        features={"penultimate": g.normal(size=(n, 4)).astype(np.float32)},
        classifier_weight=g.normal(size=(c, 4)), classifier_bias=g.normal(size=c),
        teacher={"spec": "test:logits"}, dataset={"spec": "test:tiny", "split": "train"},
        rows_per_shard=256, rows_per_chunk=128,
    )
    return tmp_path / "t.zarr"


def _files(store):
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())


def _flip(path, offset, bit=0x01):
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def _verify_fails_naming(cli, store, name):
    code, out, err = cli("verify", store)
    assert code != 0, out
    assert name in err, err
    assert "Traceback" not in err
    return err


def test_tiny_store_has_every_kind_of_file_and_verifies(tiny_store, cli):
    files = _files(tiny_store)
    for expected in ("zarr.json", "topk_values/c/1/0/0", "labels/c/0", "features/penultimate/c/0/0/0",
                     "teacher/classifier_weight/c/0/0", "teacher/classifier_bias/c/0", "units/complete/c/1",
                     "units/sha256/c/1/0/0", "units/zarr.json", "logsumexp/zarr.json"):
        assert expected in files
    code, out, _ = cli("verify", tiny_store)
    assert code == 0 and "2 units verified" in out


@pytest.mark.parametrize(
    "key, where",
    [
        ("topk_values/c/1/0/0", "data"),           # (a) inside a shard's first inner chunk
        ("label_logit/c/0/0", "index"),            # (b) inside a shard's index (at its end)
        ("teacher/classifier_weight/c/0/0", "data"),  # (c) unsharded constant arrays
        ("teacher/classifier_bias/c/0", "data"),
        ("units/complete/c/1", "data"),
        ("units/sha256/c/0/0/0", "data"),
    ],
)
def test_flipped_byte_is_named(tiny_store, cli, key, where):
    path = tiny_store / key
    size = path.stat().st_size
    _flip(path, 20 if where == "data" else size - 10)
    _verify_fails_naming(cli, tiny_store, f"bad: chunk {key}: ")


def test_truncated_shard_is_named(tiny_store, cli):  # (d)
    path = tiny_store / "topk_indices/c/0/0/0"
    path.write_bytes(path.read_bytes()[:-5])
    _verify_fails_naming(cli, tiny_store, "bad: chunk topk_indices/c/0/0/0: ")


@pytest.mark.parametrize("key", ["logsumexp/c/1/0/0", "features/penultimate/c/0/0/0", "labels/c/1",
                                 "units/complete/c/1", "units/sha256/c/0/0/0", "teacher/classifier_weight/c/0/0"])
def test_deleted_chunk_is_named(tiny_store, cli, key):  # (e), (f)
    (tiny_store / key).unlink()
    err = _verify_fails_naming(cli, tiny_store, f"bad: chunk {key}: missing")
    assert err.strip().splitlines()[-1] == f"error: {tiny_store}: 1 problem(s) found"


@pytest.mark.parametrize("key", ["zarr.json", "topk_values/zarr.json", "units/zarr.json",
                                 "teacher/classifier_bias/zarr.json"])
def test_changed_metadata_value_is_named(tiny_store, cli, key):  # (g)
    """A flip that keeps the JSON valid (a digit, a letter) is caught by metadata_sha256."""
    path = tiny_store / key
    text = path.read_text()
    offset = text.index('"zarr_format": 3') + len('"zarr_format": ')  # 3 -> 2: still valid JSON
    _flip(path, offset)
    err = _verify_fails_naming(cli, tiny_store, f"bad: metadata {key}: ")
    if key != "zarr.json":
        assert f"bad: metadata {key}: content differs from the sha256 recorded in zarr.json at finalize" in err


def test_codec_setting_and_dataset_identity_changes_are_named(tiny_store, cli):
    """Values no decoder checks: the zstd level of an array, the recorded dataset spec."""
    path = tiny_store / "topk_values" / "zarr.json"
    doc = json.loads(path.read_text())
    text = path.read_text().replace('"clevel": 9', '"clevel": 8')
    assert text != path.read_text()
    path.write_text(text)
    root = tiny_store / "zarr.json"
    root.write_text(root.read_text().replace('"test:tiny"', '"test:tinx"'))
    err = _verify_fails_naming(cli, tiny_store, "bad: metadata topk_values/zarr.json: content differs")
    assert "bad: metadata zarr.json: content differs" in err
    assert doc["zarr_format"] == 3


def test_every_file_every_region_flip_is_detected(tiny_store):
    """Flip one random bit of the first, a random middle and the last byte of EVERY file of the
    store: each flip makes verify fail and names that file. A flip in a JSON document that
    parses to the same document (e.g. exponent e <-> E) is not a change and is not counted."""
    rng = np.random.default_rng(0)
    files = _files(tiny_store)
    assert len(files) >= 30
    checked = 0
    for key in files:
        path = tiny_store / key
        original = path.read_bytes()
        for offset in sorted({0, int(rng.integers(1, len(original) - 1)), len(original) - 1}):
            _flip(path, offset, bit=1 << int(rng.integers(0, 8)))
            if key.endswith("zarr.json"):
                try:
                    if json.loads(path.read_bytes()) == json.loads(original):
                        path.write_bytes(original)
                        continue
                except ValueError:
                    pass
            report = verify_store(tiny_store)
            named = key.removesuffix("/zarr.json") if key.endswith("/zarr.json") else key
            assert not report.ok, (key, offset)
            assert any(named in p for p in report.problems), (key, offset, report.problems)
            path.write_bytes(original)
            checked += 1
    assert checked >= 3 * len(files) - 3
    assert verify_store(tiny_store).ok


def test_train_refuses_a_store_being_written(tmp_path, cli):
    from softlabels.datasets import load_dataset
    from softlabels.data import store_dataset_metadata
    from softlabels.stores.writer import StoreWriter

    _, info = load_dataset("digits", "train")
    schema = fmt.StoreSchema(num_samples=info.num_samples, num_classes=10, k=2, temperatures=(1.0, 4.0),
                             dataset=store_dataset_metadata(info))
    StoreWriter.create(tmp_path / "half.zarr", schema)
    code, _, err = cli("train", "--store", tmp_path / "half.zarr", "--dataset", "digits", "--method", "kd-topk",
                       "--epochs", "1", "--quiet", "--out", tmp_path / "o", "--allow", "spec")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'half.zarr'} is incomplete (status 'writing'); finish it with "
        "`softlabels dump ... --resume` before training from it"
    ]


# ---------------------------------------------------------------------------------------------
# A store opened for reading is read-only through our API
# ---------------------------------------------------------------------------------------------
def test_reader_has_no_write_methods_and_read_only_arrays(tiny_store):
    store = open_store(tiny_store)
    public = {name for name in dir(store) if not name.startswith("_")}
    assert not {n for n in public if any(w in n for w in ("write", "set", "put", "delete", "mark", "finalize"))}
    before = {f: (tiny_store / f).read_bytes() for f in _files(tiny_store)}
    for spec in store.schema.all_arrays():
        arr = store.array(spec.name)
        with pytest.raises(Exception, match="read.only|read-only|ReadOnly"):
            arr[0] = 0
    with pytest.raises(Exception):
        store._group.attrs["softlabels"] = {}
    assert {f: (tiny_store / f).read_bytes() for f in _files(tiny_store)} == before


@pytest.mark.parametrize("path", ["memory", "dense", "chunk-cache"])
def test_mutating_a_returned_batch_does_not_change_the_next_read(tiny_store, path):
    """Every read path returns arrays the caller may scribble on without touching the reader's
    own buffers: preloaded arrays, the dense per-array buffer and the per-chunk LRU cache."""
    cache = {"memory": 1 << 30, "dense": 1 << 30, "chunk-cache": 1}[path]
    store = open_store(tiny_store, cache_bytes=cache)
    if path == "memory":
        store.preload()
    truth = zarr.open_array(str(tiny_store / "topk_values"), mode="r")[...]
    idx = np.array([3, 300, 3, 511])
    for _ in range(2):
        batch = store.read(idx)
        assert np.array_equal(batch["topk_values"], truth[idx])
        for arr in batch.values():
            arr[...] = 0
        gathered = store.gather("topk_values", idx)
        gathered[...] = 7
        single = store.read(idx, view=0, temperature=4.0)
        single["topk_values"][...] = 0
        single["logsumexp"][...] = 0
    assert np.array_equal(store.read(idx)["topk_values"], truth[idx])
    assert np.array_equal(store.read(idx, view=0)["topk_values"], truth[idx, 0])
    weight, bias = store.classifier()
    weight[...] = 0
    assert np.abs(store.classifier()[0]).sum() > 0
    for cached in [*store._memory.values(), *store._cache.values()]:
        assert not cached.flags.writeable
