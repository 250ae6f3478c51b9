"""The dataset/store join: batches equal direct store reads, one read per batch, workers and
ranks see every index exactly once, identity mismatches are refused with exact messages."""

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from softlabels.datasets import InMemoryDataset, load_dataset
from softlabels.data import (
    BatchIndices,
    ConcatDistillDataset,
    DistillDataset,
    StoreBatchSampler,
    StoreDatasetMismatchError,
    make_loader,
    store_dataset_metadata,
)
from softlabels.errors import IncompleteStoreError, InvalidTargetsError, SoftlabelsError
from softlabels.losses import build_method
from softlabels.stores import format as fmt
from softlabels.stores.metadata import labels_fingerprint
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.stores.reader import open_store
from softlabels.stores.writer import StoreWriter

TEMPS = (1.0, 2.0, 4.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _fake_teacher(inputs: torch.Tensor, views: int = 1, seed: int = 0):
    """Deterministic teacher-like logits [N, (V,) 10] and features from a fixed random projection."""
    g = torch.Generator().manual_seed(seed)
    flat = inputs.flatten(1)
    w1 = torch.randn(flat.shape[1], 16, generator=g) / flat.shape[1] ** 0.5
    w2 = torch.randn(16, 10, generator=g)
    feats = torch.tanh(flat @ w1)
    if views > 1:
        feats = torch.stack([feats + 0.1 * v for v in range(views)], dim=1)
    logits = 3 * feats @ w2
    return logits.numpy(), feats.numpy(), w2.T.contiguous().numpy()


def _store_for(path, info, inputs, *, views=1, k=10, value_dtype="float16", rows_per_shard=256, rows_per_chunk=128):
    logits, feats, weight = _fake_teacher(inputs, views)
    write_store_from_logits(
        path,
        logits,
        k=k,
        temperatures=TEMPS,
        labels=info.labels,
        features={"penultimate": feats},
        classifier_weight=weight,
        value_dtype=value_dtype,
        teacher={"spec": "test:projection", "checkpoint_sha256": "0" * 64, "num_classes": 10},
        dataset=store_dataset_metadata(info),
        rows_per_shard=rows_per_shard,
        rows_per_chunk=rows_per_chunk,
    )
    return path


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, digits):
    ds, info = digits
    return _store_for(tmp_path_factory.mktemp("dd") / "digits.zarr", info, ds.inputs, k=6)


def _direct(store, idx, fields, view, temperature, k=None):
    arrays = store.read(idx, fields, view=view, temperature=temperature)
    if k is not None:
        arrays = {n: a[..., :k] if n in (fmt.TOPK_VALUES, fmt.TOPK_INDICES) else a for n, a in arrays.items()}
    return arrays


@pytest.mark.filterwarnings("ignore:store has top-6 of 10 classes")
@pytest.mark.parametrize("method,kwargs", [("kd", {"temperature": 2.0}), ("kd-pt", {}), ("hint", {"kd_weight": 0.5})])
def test_batches_equal_direct_store_reads(digits, digits_store, method, kwargs):
    ds, info = digits
    extra = {"student_feature_shape": 100, "teacher_feature_shape": 16} if method == "hint" else {}
    m = build_method(method, num_classes=10, **kwargs, **extra)
    data = DistillDataset.for_method(ds, digits_store, m, info=info, prepare=False)
    assert set(data.fields) == set(m.needs)
    idx = np.random.default_rng(0).permutation(len(ds))[:77]
    batch = data.__getitems__(list(idx))
    assert torch.equal(batch["index"], torch.as_tensor(idx))
    assert torch.equal(batch["input"], ds.inputs[idx]) and torch.equal(batch["label"], ds.targets[idx])
    direct = _direct(open_store(digits_store), idx, sorted(m.needs), 0, m.temperature)
    assert set(batch["targets"]) == set(m.needs)
    for name, arr in direct.items():
        got = batch["targets"][name]
        assert got.shape[0] == 77 and np.array_equal(got.numpy(), arr.astype(got.numpy().dtype)), name
    if fmt.LOGSUMEXP in m.needs:
        assert batch["targets"][fmt.LOGSUMEXP].shape == (77,)
    # the method accepts the batch as is
    logits, feats = torch.randn(77, 10), torch.randn(77, 100)
    out = m(logits, batch["label"], batch["targets"], student_features=feats)
    assert torch.isfinite(out.total)
    # built for the method (the default), a batch carries its loss-ready rows: the same loss
    ready = DistillDataset.for_method(ds, digits_store, m, info=info).__getitems__(list(idx))
    if method == "hint":  # no prepared form: the raw fields
        assert set(ready["targets"]) == set(m.needs)
    else:
        assert ready["targets"] and all(k.startswith(m.prepared_prefix) for k in ready["targets"])
    again = m(logits, ready["label"], ready["targets"], student_features=feats)
    assert again.total.item() == pytest.approx(out.total.item(), rel=2e-6)


@pytest.mark.filterwarnings("ignore:store has top-6 of 10 classes")
def test_one_store_read_per_batch(digits, digits_store):
    ds, info = digits
    m = build_method("kd", num_classes=10)
    data = DistillDataset.for_method(ds, digits_store, m, info=info, preload=False)
    calls = []
    original = data.store.read
    data.store.read = lambda idx, *a, **kw: calls.append(len(idx)) or original(idx, *a, **kw)
    sampler = StoreBatchSampler(data, 100, seed=3)
    seen = np.concatenate([data.__getitems__(ix)["index"].numpy() for ix in sampler])
    assert len(calls) == len(sampler) == 15 and sum(calls) == len(ds)
    assert np.array_equal(np.sort(seen), np.arange(len(ds)))


def test_preload_small_arrays_by_default(digits, digits_store):
    ds, info = digits
    m = build_method("hint", num_classes=10, student_feature_shape=100, teacher_feature_shape=16, kd_weight=0.5)
    data = DistillDataset.for_method(ds, digits_store, m, info=info)
    assert set(data.preloaded) == set(m.needs) and data.preloaded_all
    tight = DistillDataset.for_method(ds, open_store(digits_store), m, info=info, preload_bytes=1000)
    assert tight.preloaded == () and not tight.preloaded_all


def test_dataloader_workers_cover_every_index_once(digits, digits_store):
    ds, info = digits
    m = build_method("kd", temperature=4.0, num_classes=10)
    data = DistillDataset.for_method(ds, digits_store, m, info=info, prepare=False)
    sampler = StoreBatchSampler(data, 128, shuffle="chunks", seed=1)
    loader = make_loader(data, sampler, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(sampler)
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert np.array_equal(np.sort(seen), np.arange(len(ds)))
    store = open_store(digits_store)
    for b in batches[:3]:
        direct = _direct(store, b["index"].numpy(), sorted(m.needs), 0, 4.0)
        for name, arr in direct.items():
            assert np.array_equal(b["targets"][name].numpy(), arr.astype(b["targets"][name].numpy().dtype))


@pytest.mark.parametrize("shuffle", [False, True, "chunks"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_every_index_exactly_once(digits, digits_store, shuffle, world):
    ds, info = digits
    data = DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES])
    n = len(data)  # 1437 = 3 * 479: 3 ranks split evenly, 2 ranks need one padded index
    shards = []
    for rank in range(world):
        sampler = StoreBatchSampler(data, 50, shuffle=shuffle, seed=7, rank=rank, world_size=world)
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        shards.append(np.concatenate(batches))
    assert len({s.size for s in shards}) == 1
    allidx = np.concatenate(shards)
    assert np.array_equal(np.unique(allidx), np.arange(n))
    assert allidx.size == -(-n // world) * world  # duplicates are exactly the DistributedSampler-style padding
    trimmed = StoreBatchSampler(data, 50, shuffle=shuffle, seed=7, rank=world - 1, world_size=world, pad=False)
    assert sum(len(b) for b in trimmed) == n // world


def test_torch_distributed_sampler_batches_call_getitems(digits, digits_store):
    ds, info = digits
    data = DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES, fmt.TOPK_INDICES])
    seen = []
    for rank in range(2):
        dist = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        batch_sampler = torch.utils.data.BatchSampler(dist, batch_size=64, drop_last=False)
        loader = torch.utils.data.DataLoader(data, batch_sampler=batch_sampler, collate_fn=lambda b: b)
        for batch in loader:
            assert isinstance(batch, dict) and batch["targets"][fmt.TOPK_INDICES].dtype == torch.int64
            seen.append(batch["index"].numpy())
    seen = np.concatenate(seen)
    assert seen.size == len(data) - 1 and np.unique(seen).size == seen.size


def test_chunk_aware_shuffle_reads_few_chunks_at_a_time(digits, digits_store):
    ds, info = digits
    data = DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES])
    chunk = open_store(digits_store).schema.rows_per_chunk
    sampler = StoreBatchSampler(data, chunk, shuffle="chunks", seed=0, window_chunks=2)
    order = np.concatenate(list(sampler))
    assert np.array_equal(np.sort(order), np.arange(len(data)))
    assert not np.array_equal(order, np.arange(len(data)))
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    for c in range(-(-len(data) // chunk)):  # a chunk's rows are all read within a window of 2 chunks
        span = position[c * chunk : (c + 1) * chunk]
        assert span.max() - span.min() < 2 * chunk
    sampler.set_epoch(1)
    assert not np.array_equal(np.concatenate(list(sampler)), order)
    again = StoreBatchSampler(data, chunk, shuffle="chunks", seed=0, window_chunks=2)
    assert np.array_equal(np.concatenate(list(again)), order)


def test_view_selection(tmp_path, digits):
    ds, info = digits
    path = _store_for(tmp_path / "views.zarr", info, ds.inputs, views=3, k=4)
    store = open_store(path)
    idx = np.arange(0, 300, 7)
    fields = [fmt.TOPK_VALUES, fmt.LOGSUMEXP]
    for mode in ("first", "next", "random"):
        data = DistillDataset(ds, path, info=info, fields=fields, temperature=2.0, views=mode, seed=5)
        for epoch in range(3):
            batch = data.__getitems__(BatchIndices(idx.tolist(), epoch))
            view = batch["view"].numpy()
            if mode == "first":
                assert (view == 0).all()
            elif mode == "next":
                assert (view == epoch % 3).all()
            else:
                assert set(view) == {0, 1, 2}
                alone = data.__getitems__(BatchIndices(idx[5:9].tolist(), epoch))["view"].numpy()
                assert np.array_equal(alone, view[5:9])  # per (seed, epoch, index), not per batch
            direct = store.read(idx, fields, view=view, temperature=2.0)
            for name in fields:
                assert np.array_equal(batch["targets"][name].numpy(), direct[name])
    rnd = DistillDataset(ds, path, info=info, fields=fields, temperature=2.0, views="random", seed=5)
    e0 = rnd.__getitems__(BatchIndices(idx.tolist(), 0))["view"]
    e1 = rnd.__getitems__(BatchIndices(idx.tolist(), 1))["view"]
    assert not torch.equal(e0, e1)


def test_k_and_temperature_are_checked(digits, digits_store):
    ds, info = digits
    data = DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES, fmt.TOPK_INDICES], k=3)
    batch = data.__getitems__([0, 1, 2])
    full = open_store(digits_store).read([0, 1, 2], [fmt.TOPK_VALUES], view=0)[fmt.TOPK_VALUES]
    assert batch["targets"][fmt.TOPK_VALUES].shape == (3, 3)
    assert np.array_equal(batch["targets"][fmt.TOPK_VALUES].numpy(), full[:, :3])
    with pytest.raises(InvalidTargetsError) as e:
        DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES], k=7)
    assert str(e.value) == (
        f"k=7 but store {digits_store} only holds the top-6 logits; use --k <= 6 or re-dump with --k 7"
    )
    with pytest.raises(SoftlabelsError) as e:
        DistillDataset(ds, digits_store, info=info, fields=[fmt.LOGSUMEXP], temperature=3.0)
    assert str(e.value) == (
        "temperature 3 is not in the store's grid [1,2,4]; train at one of those or re-dump with --temperatures 1,2,4,3"
    )


def test_mismatched_sample_count_is_refused_even_when_allowed(digits_store):
    test_ds, test_info = load_dataset("digits", "test")
    expected = (
        f"store {digits_store} does not match this run's dataset: num_samples 1437 in the store, 360 here; "
        "split 'train' in the store, 'test' here; a different sample or class count cannot be overridden (store "
        "rows or targets would not fit); train on the dataset the store was dumped from, or re-dump the store "
        "for this one"
    )
    for allow in (False, True):
        with pytest.raises(StoreDatasetMismatchError) as e:
            DistillDataset(test_ds, digits_store, info=test_info, fields=[fmt.TOPK_VALUES], allow_mismatch=allow)
        assert str(e.value) == expected


def test_other_dataset_spec_is_named(digits_store):
    other_ds, other_info = load_dataset("digits:seed=1", "train")
    with pytest.raises(StoreDatasetMismatchError) as e:
        DistillDataset(other_ds, digits_store, info=other_info, fields=[fmt.TOPK_VALUES])
    here = labels_fingerprint(other_info.labels)[:12]
    stored = open_store(digits_store).schema.dataset
    assert str(e.value) == (
        f"store {digits_store} does not match this run's dataset: spec 'digits:seed=0,test_samples=360' in the "
        "store, 'digits:seed=1,test_samples=360' here; "
        f"labels_sha256 {stored['labels_sha256'][:12]} in the store, {here} here (labels differ in value or order); "
        f"content_sha256 {stored['content_sha256'][:12]} in the store, {other_info.content_sha256[:12]} here "
        "(inputs differ); train on the dataset the store was dumped from, or pass --allow spec --allow labels "
        "--allow files to train anyway"
    )


def test_shuffled_labels_and_preprocessing_mismatch_and_allow(digits, digits_store):
    ds, info = digits
    perm = np.random.default_rng(0).permutation(len(ds))
    labels = info.labels[perm]
    shuffled = InMemoryDataset(ds.inputs, torch.as_tensor(labels))
    pre = dict(info.preprocessing, scale="pixel / 255")
    bad_info = replace(info, labels=labels, preprocessing=pre)
    with pytest.raises(StoreDatasetMismatchError) as e:
        DistillDataset(shuffled, digits_store, info=bad_info, fields=[fmt.TOPK_VALUES])
    msg = str(e.value)
    assert " here (labels differ in value or order); " in msg and "; labels_sha256 " in msg
    assert ": preprocessing.scale 'pixel / 16 -> [0, 1]' in the store, 'pixel / 255' here; " in msg
    data = DistillDataset(shuffled, digits_store, info=bad_info, fields=[fmt.TOPK_VALUES], allow_mismatch=True)
    assert len(data.warnings) == 1 and data.warnings[0].endswith("; training anyway (--allow preprocessing, labels)")
    assert data.warnings[0].startswith(f"store {digits_store} does not match this run's dataset: preprocessing.scale")
    assert torch.equal(data.__getitems__([0, 1])["label"], torch.as_tensor(labels[:2]))  # the dataset's labels


def test_incomplete_store_is_refused(tmp_path, digits):
    ds, info = digits
    schema = fmt.StoreSchema(num_samples=len(ds), num_classes=10, k=2, temperatures=(1.0,), dataset=store_dataset_metadata(info))
    StoreWriter.create(tmp_path / "half.zarr", schema)
    with pytest.raises(IncompleteStoreError, match="is incomplete"):
        DistillDataset(ds, tmp_path / "half.zarr", info=info, fields=[fmt.TOPK_VALUES])
    opened = open_store(tmp_path / "half.zarr", allow_incomplete=True)
    with pytest.raises(IncompleteStoreError, match="is incomplete"):
        DistillDataset(ds, opened, info=info, fields=[fmt.TOPK_VALUES])


def test_pickled_dataset_gives_same_batches(digits, digits_store):
    ds, info = digits
    data = DistillDataset(ds, digits_store, info=info, fields=[fmt.TOPK_VALUES, fmt.LOGSUMEXP], temperature=1.0)
    clone = pickle.loads(pickle.dumps(data))
    a, b = data.__getitems__([5, 900, 3]), clone.__getitems__([5, 900, 3])
    for name in data.fields:
        assert torch.equal(a["targets"][name], b["targets"][name])
    assert torch.equal(a["input"], b["input"])


@pytest.mark.filterwarnings("ignore:store has top-3 of 10 classes")
def test_labelled_plus_transfer_concat(tmp_path):
    spec = "mnist1d:num_samples=200,transfer_samples=120"
    train, train_info = load_dataset(spec, "train")
    transfer, transfer_info = load_dataset(spec, "transfer")
    s1 = _store_for(tmp_path / "train.zarr", train_info, train.inputs, k=3)
    s2 = _store_for(tmp_path / "transfer.zarr", transfer_info, transfer.inputs, k=3)
    m = build_method("kd", temperature=2.0, num_classes=10)
    with pytest.raises(InvalidTargetsError, match="is unlabeled"):
        DistillDataset.for_method(transfer, s2, build_method("kd-pt", num_classes=10), info=transfer_info)
    parts = [
        DistillDataset.for_method(train, s1, m, info=train_info),
        DistillDataset.for_method(transfer, s2, m, info=transfer_info),
    ]
    assert parts[0].labeled and not parts[1].labeled
    data = ConcatDistillDataset(parts)
    assert len(data) == 280
    idx = np.array([279, 0, 160, 159, 200, 5])
    batch = data.__getitems__(list(idx))
    assert batch["label"].tolist()[0] == -1 and batch["label"].tolist()[1] == int(train_info.labels[0])
    assert (batch["label"][np.isin(idx, np.arange(160, 280))] == -1).all()
    for pos, i in enumerate(idx):
        part, local = (parts[0], i) if i < 160 else (parts[1], i - 160)
        single = part.__getitems__([local])
        assert torch.equal(batch["input"][pos], single["input"][0])
        assert set(single["targets"]) == set(batch["targets"]) and single["targets"]
        for name in single["targets"]:
            assert torch.equal(batch["targets"][name][pos], single["targets"][name][0])
    seen = np.concatenate(list(StoreBatchSampler(data, 64, shuffle="chunks", seed=0)))
    assert np.array_equal(np.sort(seen), np.arange(280))


def _loss_and_grad(method, logits, batch):
    z = logits.clone().requires_grad_(True)
    labels = batch["label"] if bool((batch["label"] >= 0).any()) else None
    out = method(z, labels, batch["targets"])
    out.total.backward()
    return out.total.item(), z.grad


@pytest.mark.filterwarnings("ignore:store has top-6 of 10 classes")
@pytest.mark.parametrize("method,kwargs", [("kd", {}), ("kd-topk", {"k": 3}), ("kd-pt", {"temperature": 2.0}),
                                           ("kd-sim", {}), ("kd-pt+sim", {})])
def test_prepared_batches_equal_raw_batches(digits, digits_store, method, kwargs):
    """Rows prepared once (preloaded), per batch (streamed) and the raw fields give the same
    loss and gradient, batch after batch."""
    ds, info = digits
    store = open_store(digits_store)
    m = build_method(method, num_classes=10, classifier_weight=torch.as_tensor(store.classifier()[0]), **kwargs)
    once = DistillDataset.for_method(ds, store, m, info=info)
    streamed = DistillDataset.for_method(ds, store, m, info=info, preload=False)
    raw = DistillDataset.for_method(ds, store, m, info=info, prepare=False)
    assert once._prepared and not raw._prepared
    assert bool(streamed._prepared) == (not m.needs)  # kd-sim reads no store field: nothing to stream
    g = torch.Generator().manual_seed(0)
    for ix in list(StoreBatchSampler(once, 100, seed=2))[:3]:
        batches = [d.__getitems__(ix) for d in (once, streamed, raw)]
        assert set(batches[0]["targets"]) == set(batches[1]["targets"]) != set(batches[2]["targets"])
        logits = torch.randn(len(ix), 10, generator=g) * 3
        (v0, g0), (v1, g1), (v2, g2) = (_loss_and_grad(m, logits, b) for b in batches)
        assert v0 == v1 and torch.equal(g0, g1)  # the same function, once or per batch
        assert v0 == pytest.approx(v2, rel=2e-6)
        torch.testing.assert_close(g0, g2, rtol=1e-5, atol=1e-7)


def test_prepared_concat_with_unlabelled_rows_views_and_workers(tmp_path):
    """A labelled split + an unlabelled transfer split (mixed labels in one batch), a store with
    3 views read per epoch, and DataLoader workers: prepared rows give the raw fields' loss."""
    spec = "mnist1d:num_samples=200,transfer_samples=120"
    train, train_info = load_dataset(spec, "train")
    transfer, transfer_info = load_dataset(spec, "transfer")
    s1 = _store_for(tmp_path / "train.zarr", train_info, train.inputs, k=4, views=3)
    s2 = _store_for(tmp_path / "transfer.zarr", transfer_info, transfer.inputs, k=4, views=3)
    m = build_method("kd", temperature=2.0, num_classes=10)

    def build(**kw):
        return ConcatDistillDataset([
            DistillDataset.for_method(train, s1, m, info=train_info, views="next", **kw),
            DistillDataset.for_method(transfer, s2, m, info=transfer_info, views="next", **kw),
        ])

    with pytest.warns(UserWarning, match="top-4 of 10"):
        ready, raw = build(), build(prepare=False)
        assert all(p._prepared for p in ready.parts)
        idx = BatchIndices([279, 0, 160, 159, 200, 5, 17], epoch=2)
        a, b = ready.__getitems__(idx), raw.__getitems__(idx)
        assert (a["label"] < 0).any() and (a["label"] >= 0).any() and a["view"].tolist() == [2] * 7
        logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(3))
        (va, ga), (vb, gb) = _loss_and_grad(m, logits, a), _loss_and_grad(m, logits, b)
        assert va == pytest.approx(vb, rel=2e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    sampler = StoreBatchSampler(ready, 64, seed=1)
    for batch in make_loader(ready, sampler, num_workers=2):
        here = ready.__getitems__(batch["index"].tolist())
        assert set(batch["targets"]) == set(here["targets"])
        assert all(torch.equal(batch["targets"][k], here["targets"][k]) for k in here["targets"])
