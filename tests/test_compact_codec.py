"""The compact target codec (format 1.2, docs/FORMAT.md §8): an independent Zarr v3 reader
(tensorstore) reads every array, numpy alone decodes the targets with the documented formula
and gets the reader's values; fidelity is recorded and shown; version refusal; verify, copy and
training work unchanged."""

import json

import numpy as np
import pytest
import torch

from softlabels.stores import format as fmt
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.stores.reader import open_store

N, V, C, K, TEMPS = 600, 3, 40, 5, (2.0, 4.0)  # T = 1 not in the grid: the tail's extra column


@pytest.fixture(scope="module")
def logits():
    g = np.random.default_rng(3)
    labels = g.integers(0, C, N)
    z = g.normal(0, 2.0, (N, 1, C)) + g.normal(0, 0.3, (N, V, C))  # views alike, not equal
    z[np.arange(N), :, labels] += 5.0
    return z.astype(np.float32), labels


@pytest.fixture(scope="module")
def stores(tmp_path_factory, logits):
    z, labels = logits
    root = tmp_path_factory.mktemp("compact")
    kw = dict(k=K, temperatures=TEMPS, labels=labels, teacher={"spec": "test:logits"},
              dataset={"spec": "test:compact", "split": "train"}, rows_per_shard=256, rows_per_chunk=128)
    write_store_from_logits(root / "fp16.zarr", z, **kw)
    write_store_from_logits(root / "compact.zarr", z, codec="compact", **kw)
    return root / "fp16.zarr", root / "compact.zarr"


@pytest.fixture(scope="module")
def single_view(tmp_path_factory, logits):
    z, labels = logits
    path = tmp_path_factory.mktemp("compact1") / "compact.zarr"
    write_store_from_logits(path, z[:, :1], k=K, temperatures=TEMPS, labels=labels, teacher={"spec": "test:logits"},
                            dataset={"spec": "test:compact", "split": "train"}, rows_per_shard=256, rows_per_chunk=128,
                            codec="compact")
    return path


def _decode_by_the_formula(path):
    """FORMAT.md §8, with tensorstore and numpy only."""
    import tensorstore as ts

    def read(name):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
        return ts.open(spec, read=True).result().read().result()

    codec = json.loads((path / "zarr.json").read_text())["attributes"]["softlabels"]["schema"]["codec"]
    return _formula(codec, TEMPS, *(read(f"compact/{a}") for a in ("indices", "logp_gaps", "tail", "label_gap")))


def _formula(codec, temps, ids, gaps, tail, label_gap):
    step, tstep, off, temps_t = codec["logp_step"], codec["tail_step"], codec["tail_offset"], codec["tail_temperatures"]
    d = step * np.cumsum(gaps.astype(np.float64), axis=-1)
    m = 1.0 / (1.0 + np.exp(-tstep * (tail.astype(np.float64) - off)))
    top = np.log(1.0 - m[..., temps_t.index(1.0)]) - np.log(np.exp(-d).sum(-1))
    lse = np.stack([top / t + np.log(np.exp(-d / t).sum(-1)) - np.log(1.0 - m[..., temps_t.index(t)]) for t in temps], -1)
    return {"topk_indices": ids, "topk_values": top[..., None] - d, "logsumexp": lse, "label_logit": top - step * label_gap}


def test_decoding_many_rows_and_far_ranks_follows_the_formula():
    """Past 8,192 rows the decoder works block by block, and ranks 512+ nats below the top-1 leave
    its exp table: both still give the documented formula's values, row for row."""
    from softlabels.stores.codecs.compact import CompactCodec

    codec = CompactCodec(300, 6, (2.0, 4.0))
    g = np.random.default_rng(0)
    n = 8192 + 700
    gaps = g.integers(0, 40, (n, 2, 6)).astype(np.uint16)
    gaps[:, :, 0] = 0
    gaps[8500:8600, 1, 5] = 9000  # one block reaches past the table, the others do not
    raw = {"compact/indices": g.integers(0, 300, (n, 2, 6)).astype(np.uint16), "compact/logp_gaps": gaps,
           "compact/tail": g.integers(60, 140, (n, 2, 3)).astype(np.uint8),
           "compact/label_gap": g.integers(0, 30, (n, 2)).astype(np.uint16)}
    ours = codec.decode(raw, ["topk_values", "topk_indices", "logsumexp", "label_logit"])
    theirs = _formula(codec.to_dict(), (2.0, 4.0), *raw.values())
    np.testing.assert_array_equal(ours["topk_indices"], theirs["topk_indices"])
    for name in ("topk_values", "logsumexp", "label_logit"):
        assert ours[name].shape == theirs[name].shape and ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("views", [V, 1])
def test_tensorstore_reads_every_array_and_numpy_decodes_them_to_the_readers_targets(stores, single_view, views):
    ts = pytest.importorskip("tensorstore")
    path = stores[1] if views > 1 else single_view
    store = open_store(path)
    specs = store.schema.all_arrays()
    names = {s.name for s in specs}
    assert {"compact/indices", "compact/logp_gaps", "compact/tail", "compact/label_gap", "labels",
            fmt.UNITS_CODEC_FIDELITY} <= names and "topk_values" not in names
    for spec in specs:
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / spec.name)}},
                      read=True).result()
        theirs = arr.read().result()
        assert theirs.dtype == np.dtype(spec.dtype) and theirs.shape == spec.shape, spec.name
        np.testing.assert_array_equal(theirs, store.array(spec.name)[...], err_msg=spec.name)
        if spec.name.startswith("compact/"):
            assert spec.dtype in ("uint8", "uint16")
    gaps = json.loads((path / "compact/logp_gaps/zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    # FORMAT.md §8: one view rank-major (transpose) + bitshuffle; several views row-major + byte shuffle
    chain = (["transpose"] if views == 1 else []) + ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in gaps] == chain
    assert gaps[-2]["configuration"]["shuffle"] == ("bitshuffle" if views == 1 else "shuffle")

    ours = store.read(np.arange(N))
    theirs = _decode_by_the_formula(path)
    np.testing.assert_array_equal(ours["topk_indices"], theirs["topk_indices"])
    for name in ("topk_values", "logsumexp", "label_logit"):
        assert ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_compact_targets_are_close_to_fp16_and_the_recorded_fidelity_is_right(stores, logits):
    fp16, compact = (open_store(p) for p in stores)
    a, b = fp16.read(np.arange(N)), compact.read(np.arange(N))
    np.testing.assert_array_equal(a["topk_indices"], b["topk_indices"])  # ids are lossless, every view
    from softlabels.targets import topk_distribution

    z, _ = logits
    exact = torch.softmax(torch.from_numpy(z).double(), -1)
    for j, t in enumerate(TEMPS):
        p, q = (topk_distribution(torch.from_numpy(f["topk_values"].astype(np.float32)),
                                  torch.from_numpy(f["topk_indices"].astype(np.int64)),
                                  torch.from_numpy(f["logsumexp"][..., j]), t, C).double() for f in (a, b))
        kl = (p * (p.log() - q.log())).sum(-1)
        assert kl.mean() < 1e-3 and kl.max() < 1e-2, (t, kl.mean(), kl.max())
        assert torch.equal(q.argmax(-1), exact.argmax(-1))  # top-1 agreement: 100 %
    rec = compact.meta.summary["codec_fidelity"]
    assert set(rec["kl"]) == {"2", "4"} and rec["top1_agreement"] == 1.0
    assert 0 < rec["kl"]["2"]["mean"] < 1e-3 and rec["kl"]["2"]["mean"] <= rec["kl"]["2"]["max"]
    per_unit = compact.array(fmt.UNITS_CODEC_FIDELITY)[...]
    assert per_unit.shape == (3, 2, 4) and per_unit[:, :, 2].sum(0).tolist() == [N * V, N * V]
    small = open_store(stores[1], cache_bytes=4096).read(np.arange(N))  # too big to decode whole: per batch
    assert all(np.array_equal(small[n], b[n]) for n in b)
    preloaded = open_store(stores[1]).preload()  # decoded once into memory: the same rows
    c = preloaded.read(np.arange(N))
    assert all(np.array_equal(c[n], b[n]) for n in b)
    assert stores[1].stat() and compact.bytes_on_disk() < 0.7 * fp16.bytes_on_disk()


def test_info_shows_codec_and_fidelity_and_verify_and_copy_work(stores, cli, tmp_path):
    _, path = stores
    code, out, err = cli("info", path)
    assert code == 0, err
    assert "compact (log-prob step 0.125 nats" in out and "codec KL T=2" in out and "codec top-1 agreement" in out
    assert "100.000 %" in out
    code, out, err = cli("info", path, "--json")
    data = json.loads(out)
    assert data["codec"] == "compact" and data["format_version"] == fmt.FORMAT_VERSION == "1.2"
    code, out, err = cli("verify", path)
    assert code == 0 and "3 units verified" in out, err
    code, out, err = cli("copy", path, tmp_path / "copy.zarr")
    assert code == 0, err
    np.testing.assert_array_equal(open_store(tmp_path / "copy.zarr").read(np.arange(N))["topk_values"],
                                  open_store(path).read(np.arange(N))["topk_values"])
    # verify names damage in a coded array like any other (on a copy: the fixture is shared)
    damaged = tmp_path / "copy.zarr" / "compact/tail/c/0/0/0"
    raw = bytearray(damaged.read_bytes())
    raw[40] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    record = tmp_path / "copy.zarr" / "units/codec_fidelity/c/1/0/0"
    record.write_bytes(record.read_bytes()[:-1])
    code, out, err = cli("verify", tmp_path / "copy.zarr")
    assert code == 1 and "bad: chunk compact/tail/c/0/0/0" in err and "bad: chunk units/codec_fidelity/c/1/0/0" in err


def test_a_1_1_reader_refuses_a_compact_store_in_one_line(stores, cli, monkeypatch):
    fp16, compact = stores
    meta = json.loads((compact / "zarr.json").read_text())["attributes"]["softlabels"]
    assert meta["min_reader_version"] == "1.2" and meta["schema"]["value_dtype"] == "uint8"
    assert "min_reader_version" not in json.loads((fp16 / "zarr.json").read_text())["attributes"]["softlabels"]
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "1.1")
    for command in ("info", "verify"):
        code, out, err = cli(command, compact)
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [
            f"error: {compact} uses softlabels store format 1.2 (target codec 'compact'), which needs a reader of "
            "format 1.2 or newer; this reader is 1.1: upgrade softlabels (pip install -U softlabels)"
        ]
    code, out, err = cli("info", fp16)  # fp16 stores of format 1.2 stay readable by 1.1
    assert code == 0, err


def test_our_reader_reads_1_1_stores(stores, tmp_path):
    """A 1.1 store (no codec key, format_version 1.1) reads as before."""
    import shutil

    from tests.test_interop import _rewrite_as_written_by

    old = tmp_path / "old.zarr"
    shutil.copytree(stores[0], old)
    _rewrite_as_written_by(old, "1.1")
    store = open_store(old)
    assert store.meta.format_version == "1.1" and store.schema.codec is None
    assert np.array_equal(store.read(np.arange(10))["topk_values"], open_store(stores[0]).read(np.arange(10))["topk_values"])


def test_kd_topk_loss_from_a_compact_store_matches_fp16(stores):
    """The losses read decoded compact fields unchanged: kd-topk from either store agrees."""
    from softlabels.losses import build_method

    fp16, compact = (open_store(p) for p in stores)
    idx = np.arange(256)
    student = torch.randn(256, C, generator=torch.Generator().manual_seed(0))
    labels = torch.from_numpy(fp16.read(idx, ["labels"])["labels"]).long()
    losses = []
    for store in (fp16, compact):
        f = store.read(idx, ["topk_values", "topk_indices", "logsumexp"], view=0, temperature=4.0)
        targets = {n: torch.from_numpy(a.astype(np.int64) if n == "topk_indices" else a) for n, a in f.items()}
        out = build_method("kd-topk", temperature=4.0, num_classes=C)(student, labels, targets)
        losses.append(float(out.total))
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)  # T^2 = 16 amplifies the ~1e-4 target KL


def test_compact_codec_refuses_what_it_cannot_store(tmp_path):
    from softlabels.errors import InvalidTargetsError

    with pytest.raises(InvalidTargetsError, match="up to 65,536 classes"):
        fmt.StoreSchema(num_samples=10, num_classes=70_000, k=5, temperatures=(1.0,), codec={"name": "compact"})
    with pytest.raises(InvalidTargetsError, match="fp16 codec only"):
        fmt.StoreSchema(num_samples=10, num_classes=10, k=5, temperatures=(1.0,), value_dtype="float32",
                        codec={"name": "compact"})


def test_dump_codec_flag_errors(cli, tmp_path, mnist1d_teacher):
    from assertions import one_line_error

    base = ["dump", "--teacher", "builtin:cnn", "--weights", mnist1d_teacher, "--dataset", "mnist1d:num_samples=1000",
            "--out", tmp_path / "s", "--quiet", "--workers", "1"]
    one_line_error(*cli(*base, "--codec", "int4"), "--codec must be fp16 or compact", "'int4'")
    one_line_error(*cli(*base, "--codec", "compact", "--value-dtype", "float32"), "--value-dtype applies to --codec fp16")
    assert not (tmp_path / "s").exists()
