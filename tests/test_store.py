"""Store format v1: round trip, vectorised reads, resume protocol, errors, read-only."""

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
import zarr

from softlabels.errors import (
    IncompleteStoreError,
    InvalidTargetsError,
    NotAStoreError,
    SchemaMismatchError,
    StoreExistsError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from softlabels.stores import StoreSchema, StoreWriter, open_store
from softlabels.stores import format as fmt
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.targets import summarize_logits, topk_distribution


def test_round_trip_matches_dense_softmax(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 10, generator=g) * 3
    labels = torch.randint(0, 10, (1000,), generator=g).numpy()
    write_store_from_logits(tmp_path / "s", z, k=10, temperatures=(1, 4), labels=labels, value_dtype="float32")
    store = open_store(tmp_path / "s")
    idx = np.array([999, 3, 3, 500, 0])
    b = store.read(idx, view=0, temperature=4)
    dist = topk_distribution(torch.from_numpy(b["topk_values"]), torch.from_numpy(b["topk_indices"]),
                             torch.from_numpy(b["logsumexp"]), 4.0, 10)
    assert torch.allclose(dist, torch.softmax(z[idx] / 4, -1), atol=1e-6)
    assert b["labels"].tolist() == labels[idx].tolist()
    assert b["topk_indices"].dtype == np.uint16 and b["topk_values"].dtype == np.float32


def test_layout_dtypes_and_shapes(small_store):
    store = open_store(small_store)
    s = store.schema
    assert (s.rows_per_shard, s.rows_per_chunk, s.num_units) == (256, 128, 12)
    shapes = {a.name: (store.array(a.name).shape, str(store.array(a.name).dtype)) for a in s.all_arrays()}
    assert shapes["topk_values"] == ((3000, 1, 4), "float16")
    assert shapes["topk_indices"] == ((3000, 1, 4), "uint16")
    assert shapes["logsumexp"] == ((3000, 1, 3), "float32")
    assert shapes["label_logit"] == ((3000, 1), "float16")
    assert shapes["labels"] == ((3000,), "int32")
    assert shapes["features/penultimate"] == ((3000, 1, 8), "float16")
    assert shapes["teacher/classifier_weight"] == ((12, 8), "float32")
    meta = json.loads((small_store / "zarr.json").read_text())["attributes"]["softlabels"]
    assert meta["format_version"] == fmt.FORMAT_VERSION and meta["status"] == "complete"
    codecs = json.loads((small_store / "topk_values" / "zarr.json").read_text())["codecs"][0]
    assert codecs["name"] == "sharding_indexed"
    assert [c["name"] for c in codecs["configuration"]["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in codecs["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert codecs["configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"


def test_int32_indices_above_65536_classes():
    s = StoreSchema(num_samples=10, num_classes=70_000, k=5, temperatures=(1,))
    assert s.index_dtype == "int32"
    assert StoreSchema(num_samples=10, num_classes=65_536, k=5, temperatures=(1,)).index_dtype == "uint16"


def test_vectorised_read_any_order_equals_bulk(small_store):
    store = open_store(small_store, cache_bytes=4096)  # tiny cache: exercises eviction
    bulk = store.array("topk_values")[...]
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(3000)[:700], np.sort(rng.integers(0, 3000, 333)), np.array([2999, 0, 2999]), np.array([], int)):
        assert np.array_equal(store.gather("topk_values", idx), bulk[idx])
    feats = store.read([5, 1, 2999], fields=["features/penultimate"], view=0)["features/penultimate"]
    assert feats.shape == (3, 8) and feats.dtype == np.float16
    preloaded = open_store(small_store).preload()
    idx = rng.integers(0, 3000, 256)
    a, b = preloaded.read(idx), store.read(idx)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(IndexError, match="0..2999"):
        store.gather("labels", [3000])


def test_reader_is_picklable_and_read_only(small_store):
    import pickle

    store = pickle.loads(pickle.dumps(open_store(small_store).preload(["labels"])))
    assert store.read([7], fields=["labels"])["labels"].shape == (1,)
    with pytest.raises(Exception, match="read.only|read-only|ReadOnly"):
        store.array("labels")[0] = 3
    before = (small_store / "labels" / "zarr.json").read_bytes()
    with pytest.raises(Exception):
        store._group.attrs["softlabels"] = {}
    assert (small_store / "labels" / "zarr.json").read_bytes() == before


def test_summary_statistics(small_store, small_logits):
    logits, labels = small_logits
    summary = open_store(small_store).meta.summary
    z = torch.from_numpy(logits)
    for t in (1, 2, 4):
        mass = torch.softmax(z / t, -1).topk(4, -1).values.sum(-1)
        assert summary["topk_mass"][f"{t:g}"]["mean"] == pytest.approx(float(mass.mean()), abs=2e-3)
        assert summary["topk_mass"][f"{t:g}"]["min"] == pytest.approx(float(mass.min()), abs=2e-3)
    assert summary["teacher_top1_accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))


def _schema(n=1000, **kw):
    base = dict(num_samples=n, num_classes=10, k=3, temperatures=(1, 2), rows_per_shard=256, rows_per_chunk=128,
                teacher={"spec": "t"}, dataset={"spec": "d"})
    base.update(kw)
    return StoreSchema(**base)


def _fields(schema, unit, seed=0):
    start, stop = schema.unit_range(unit)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(schema.num_samples, 1, schema.num_classes, generator=g)[start:stop]
    labels = torch.randint(0, schema.num_classes, (schema.num_samples,), generator=g)[start:stop]
    f = {k: v.numpy() for k, v in summarize_logits(z, schema.k, schema.temperatures, labels[:, None]).items()}
    f["labels"] = labels.numpy()
    return f


def test_resume_continues_and_refuses_other_schema(tmp_path):
    path = tmp_path / "s"
    schema = _schema()
    w = StoreWriter.create(path, schema)
    assert w.pending_units() == [0, 1, 2, 3]
    for u in (0, 2):
        w.mark_complete(u, w.write_unit(u, _fields(schema, u)))
    w.write_unit(1, _fields(schema, 1))  # written but never recorded: must be redone
    with pytest.raises(IncompleteStoreError, match="incomplete .status 'writing'.*--resume"):
        open_store(path)
    with pytest.raises(IncompleteStoreError, match="2 of 4 units are not written"):
        w.finalize()
    with pytest.raises(StoreExistsError, match="already exists; pass --resume .* or --overwrite"):
        StoreWriter.create(path, schema)
    with pytest.raises(SchemaMismatchError, match=r"^cannot resume .*: k: store has 3, this run has 4"):
        StoreWriter.create(path, _schema(k=4), resume=True)
    with pytest.raises(SchemaMismatchError, match="dataset.spec: store has 'd', this run has 'e'"):
        StoreWriter.create(path, _schema(dataset={"spec": "e"}), resume=True)
    w2 = StoreWriter.create(path, schema, resume=True)
    assert w2.pending_units() == [1, 3]
    for u in w2.pending_units():
        w2.mark_complete(u, w2.write_unit(u, _fields(schema, u)))
    w2.finalize()
    store = open_store(path)
    whole = [_fields(schema, u) for u in range(4)]
    assert np.array_equal(store.array("topk_indices")[...], np.concatenate([f["topk_indices"] for f in whole]))


def test_concurrent_writers_from_processes(tmp_path):
    path = tmp_path / "s"
    schema = _schema(n=2000)
    StoreWriter.create(path, schema)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        digests = pool.starmap(_write_in_process, [(str(path), u) for u in range(schema.num_units)])
    w = StoreWriter(path)
    for u, d in enumerate(digests):
        w.mark_complete(u, d)
    w.finalize()
    expect = np.concatenate([_fields(schema, u)["topk_values"] for u in range(schema.num_units)]).astype(np.float16)
    assert np.array_equal(open_store(path).array("topk_values")[...], expect)


def _write_in_process(path, unit):
    w = StoreWriter(path)
    return w.write_unit(unit, _fields(w.schema, unit))


def test_writer_rejects_bad_targets(tmp_path):
    w = StoreWriter.create(tmp_path / "s", _schema())
    f = _fields(w.schema, 0)
    bad = dict(f, logsumexp=np.where(np.arange(f["logsumexp"].size).reshape(f["logsumexp"].shape) == 5, np.inf, f["logsumexp"]))
    with pytest.raises(InvalidTargetsError, match="unit 0: logsumexp contains NaN/inf; nothing was written"):
        w.write_unit(0, bad)
    assert not (tmp_path / "s" / "logsumexp" / "c" / "0").exists()
    with pytest.raises(InvalidTargetsError, match="overflows float16"):
        w.write_unit(0, dict(f, topk_values=f["topk_values"] * 0 + 1e6))  # below -65504 is clamped: test_float16_clamp
    with pytest.raises(InvalidTargetsError, match="labels outside 0..9"):
        w.write_unit(0, dict(f, labels=f["labels"] * 0 - 1))
    with pytest.raises(InvalidTargetsError, match="missing \\['labels'\\]"):
        w.write_unit(0, {k: v for k, v in f.items() if k != "labels"})
    with pytest.raises(InvalidTargetsError, match=r"k=11 is outside 1\.\.10"):
        _schema(k=11)


def test_float16_cast_and_finite_check_match_numpy():
    """The writer casts float32 -> float16 with torch and tests float16 finiteness by exponent
    bits (both far faster than numpy): the bytes and the verdicts must be numpy's."""
    from softlabels.stores.writer import _all_finite, _cast_float

    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)  # ~1 M patterns over all float32
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]  # NaN is rejected before any cast; its payload is not specified
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = _cast_float(x.copy(), "float16")
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))
    for arr in (want, want[np.isfinite(want)], np.array([np.nan], np.float16), x):
        assert _all_finite(arr) == bool(np.isfinite(arr).all())


def test_writer_rejects_bad_float16_input(tmp_path):
    """Features handed over as float16 take the exponent-bits check; float32 ones the cast."""
    schema = _schema(features=(("penultimate", 6),))
    w = StoreWriter.create(tmp_path / "s", schema)
    f = _fields(schema, 0)
    rows = f["labels"].shape[0]
    feats = np.ones((rows, 1, 6), np.float16)
    w.write_unit(0, dict(f, **{"features/penultimate": feats}))
    feats[3, 0, 2] = np.inf
    with pytest.raises(InvalidTargetsError, match="features/penultimate contains NaN/inf"):
        w.write_unit(0, dict(f, **{"features/penultimate": feats}))
    with pytest.raises(InvalidTargetsError, match="features/penultimate overflows float16"):
        w.write_unit(0, dict(f, **{"features/penultimate": np.full((rows, 1, 6), 65520.0, np.float32)}))


def test_open_errors(tmp_path, small_store):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "nope")
    zarr.create_group(str(tmp_path / "plain"), zarr_format=3)
    with pytest.raises(NotAStoreError, match="not a softlabels store"):
        open_store(tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="not a softlabels store"):
        open_store(tmp_path / "empty")
    meta_path = small_store / "zarr.json"
    doc = json.loads(meta_path.read_text())
    doc["attributes"]["softlabels"]["format_version"] = "2.0"
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatError, match=f"format 2.0, newer than this reader's {fmt.FORMAT_VERSION}; upgrade"):
        open_store(small_store)


def test_overwrite_only_deletes_stores(tmp_path, small_store):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(StoreExistsError, match="refusing to overwrite .* not a softlabels store"):
        StoreWriter.create(tmp_path / "precious", _schema(), overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()
    w = StoreWriter.create(small_store, _schema(), overwrite=True)
    assert w.pending_units() == [0, 1, 2, 3] and w.schema.k == 3


def test_resume_repairs_a_crash_during_creation(tmp_path):
    """Killed after the classifier array was created but before it was filled: resume refills it."""
    weight = np.arange(30, dtype=np.float32).reshape(10, 3)
    schema = _schema(classifier_dim=3)
    StoreWriter.create(tmp_path / "s", schema, classifier_weight=weight)
    arr = zarr.open_array(str(tmp_path / "s" / "teacher" / "classifier_weight"), mode="r+")
    arr[...] = 0  # what a crash between create_array and the write leaves behind
    import shutil

    shutil.rmtree(tmp_path / "s" / "units" / "sha256")  # and an array never created
    w = StoreWriter.create(tmp_path / "s", schema, classifier_weight=weight, resume=True)
    for u in w.pending_units():
        w.mark_complete(u, w.write_unit(u, _fields(schema, u)))
    w.finalize()
    assert np.array_equal(open_store(tmp_path / "s").classifier()[0], weight)
