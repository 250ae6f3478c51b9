"""Dataset specs: real generated data, exact sizes, canonical specs, clear errors."""

from __future__ import annotations

import json
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from softlabels.datasets import DatasetInfo, InMemoryDataset, inputs_sha256, list_datasets, load_dataset
from softlabels.datasets import mnist1d as mnist1d_mod
from softlabels.datasets.synthetic import class_geometry, label_inputs
from softlabels.errors import SpecError

SMALL = "mnist1d:num_samples=200,seed=3,transfer_samples=300"


def test_list_datasets_names_builtins_and_path_datasets():
    names = list_datasets()
    for name in ("mnist1d", "digits", "synthetic", "cifar10", "cifar100", "mnist", "fashionmnist", "imagefolder"):
        assert name in names


def test_unknown_dataset_lists_known_names():
    with pytest.raises(SpecError, match=r"unknown dataset 'nope'; known: mnist1d, digits, synthetic, cifar10"):
        load_dataset("nope")


# ------------------------------------------------------------------------------------- mnist1d


def test_mnist1d_defaults_are_the_standard_4000_1000_split():
    train, info = load_dataset("mnist1d", "train")
    test, test_info = load_dataset("mnist1d", "test")
    assert (info.num_samples, test_info.num_samples) == (4000, 1000)
    assert len(train) == 4000 and len(test) == 1000
    assert info.spec == "mnist1d:num_samples=5000,train_split=0.8,seed=42,transfer_samples=20000"
    assert info.input_shape == (40,) and info.num_classes == 10
    assert info.labels.dtype == np.int64 and set(np.unique(info.labels)) == set(range(10))
    assert train.inputs.dtype == torch.float32 and tuple(train.inputs.shape) == (4000, 40)
    x, y = train[7]
    assert isinstance(y, int) and y == int(info.labels[7]) and torch.equal(x, train.inputs[7])
    # make_dataset's convention: train+test together are standardised to mean 0, std 1
    both = torch.cat([train.inputs, test.inputs]).double()
    assert abs(float(both.mean())) < 1e-6 and abs(float(both.std(unbiased=False)) - 1.0) < 1e-5
    assert info.content_sha256 == inputs_sha256(train.inputs)


def test_mnist1d_is_bitwise_make_dataset_and_leaves_global_rng_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 200, 3
    reference = make_dataset(args)
    np.random.seed(123)
    random.seed(7)
    train, info = load_dataset(SMALL, "train")
    test, test_info = load_dataset(SMALL, "test")
    assert np.random.rand() == np.random.RandomState(123).rand()  # state restored
    assert random.random() == random.Random(7).random()
    assert np.array_equal(train.inputs.numpy(), reference["x"].astype(np.float32))
    assert np.array_equal(test.inputs.numpy(), reference["x_test"].astype(np.float32))
    assert np.array_equal(info.labels, reference["y"]) and np.array_equal(test_info.labels, reference["y_test"])


def test_mnist1d_transfer_is_unlabeled_new_data_with_train_preprocessing():
    train, info = load_dataset(SMALL, "train")
    transfer, tinfo = load_dataset(SMALL, "transfer")
    assert tinfo.labels is None and tinfo.num_samples == 300 and len(transfer) == 300
    assert transfer[0][1] == -1 and bool((transfer.targets == -1).all())
    assert tinfo.preprocessing["normalize"] == info.preprocessing["normalize"]
    assert tinfo.preprocessing["transfer_seed"] == mnist1d_mod.transfer_seed(3) != 3
    assert tinfo.spec == info.spec and tinfo.split == "transfer"
    # fresh sequences, not copies of the train set
    dist = torch.cdist(transfer.inputs[:50], train.inputs)
    assert float(dist.min()) > 1e-3
    again, again_info = load_dataset(SMALL, "transfer")
    assert again_info.content_sha256 == tinfo.content_sha256


def test_canonical_spec_is_order_and_case_insensitive():
    _, a = load_dataset("MNIST1D: seed=3 , num_samples=200,transfer_samples=300", "test")
    _, b = load_dataset(SMALL, "test")
    assert a.spec == b.spec == "mnist1d:num_samples=200,train_split=0.8,seed=3,transfer_samples=300"
    assert a == b and a.content_sha256 == b.content_sha256


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist1d:num_samples=205", r"mnist1d: num_samples=205 must be a multiple of 10"),
        ("mnist1d:epochs=3", r"unknown parameter 'epochs' \(accepted: num_samples, train_split, seed, transfer_samples\)"),
        ("mnist1d:seed=abc", r"mnist1d: seed must be an integer, got 'abc'"),
        ("mnist1d:seed", r"expected key=value in the spec, got 'seed'"),
        ("mnist1d:train_split=1.5", r"train_split=1.5 must be strictly between 0 and 1"),
        ("mnist1d:seed=1,seed=2", r"parameter 'seed' given twice"),
    ],
)
def test_mnist1d_bad_parameters(spec, message):
    with pytest.raises(SpecError, match=message):
        load_dataset(spec)


def test_unknown_split_lists_available_ones():
    with pytest.raises(SpecError, match=r"mnist1d has no split 'val' \(available: train, test, transfer\)"):
        load_dataset(SMALL, "val")


def test_info_to_dict_is_json_without_labels():
    _, info = load_dataset(SMALL, "train")
    data = info.to_dict()
    assert "labels" not in data
    assert json.loads(json.dumps(data)) == data
    assert data["input_shape"] == [40] and data["num_samples"] == 160
    assert hash(info) == hash(load_dataset(SMALL, "train")[1])


def test_in_memory_dataset_pickles_and_is_index_deterministic():
    ds, _ = load_dataset(SMALL, "train")
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone, InMemoryDataset)
    for i in (0, 5, 159):
        assert torch.equal(clone[i][0], ds[i][0]) and clone[i][1] == ds[i][1]
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    x, y = next(iter(loader))
    assert torch.equal(x, ds.inputs[:32]) and torch.equal(y, ds.targets[:32])


# -------------------------------------------------------------------------------------- digits


def test_digits_stratified_split_shapes_and_scale():
    train, info = load_dataset("digits", "train")
    test, test_info = load_dataset("digits", "test")
    assert (info.num_samples, test_info.num_samples) == (1437, 360)
    assert info.input_shape == (1, 8, 8) and tuple(train.inputs.shape) == (1437, 1, 8, 8)
    assert float(train.inputs.min()) == 0.0 and float(train.inputs.max()) == 1.0
    assert info.spec == "digits:seed=0,test_samples=360"
    counts = np.bincount(test_info.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    other, other_info = load_dataset("digits:seed=1", "test")
    assert other_info.content_sha256 != test_info.content_sha256


def test_digits_has_no_transfer_split():
    with pytest.raises(SpecError, match=r"digits has no transfer split \(all 1,797 images are labelled"):
        load_dataset("digits", "transfer")


# ----------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_synthetic_class_vectors_have_cosine_tau_with_their_superclass(tau):
    basis, weights = class_geometry(seed=0, num_classes=20, superclasses=4, dim=16, tau=tau)
    assert np.allclose(basis @ basis.T, np.eye(4), atol=1e-12)
    assert np.allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-12)
    cos = weights @ basis.T  # [C, S]
    for c in range(20):
        s = c // 5
        assert abs(cos[c, s] - tau) < 1e-6
    if tau == 1.0:
        for s in range(4):
            block = weights[s * 5 : (s + 1) * 5]
            assert np.allclose(block @ block.T, 1.0, atol=1e-12)


def test_synthetic_tau_sweep_moves_the_same_vectors():
    basis_a, w_a = class_geometry(seed=1, num_classes=10, superclasses=2, dim=8, tau=0.2)
    basis_b, w_b = class_geometry(seed=1, num_classes=10, superclasses=2, dim=8, tau=0.8)
    assert np.array_equal(basis_a, basis_b)
    v_a = (w_a - 0.2 * np.repeat(basis_a, 5, axis=0)) / np.sqrt(1 - 0.2**2)
    v_b = (w_b - 0.8 * np.repeat(basis_b, 5, axis=0)) / np.sqrt(1 - 0.8**2)
    assert np.allclose(v_a, v_b, atol=1e-12)


def test_synthetic_splits_share_geometry_and_draw_different_inputs():
    spec = "synthetic:num_classes=10,superclasses=2,dim=8,train_samples=400,test_samples=300,transfer_samples=200,seed=5"
    train, info = load_dataset(spec, "train")
    test, test_info = load_dataset(spec, "test")
    transfer, transfer_info = load_dataset(spec, "transfer")
    assert (info.num_samples, test_info.num_samples, transfer_info.num_samples) == (400, 300, 200)
    assert info.input_shape == (8,) and info.num_classes == 10 and transfer_info.labels is None
    _, weights = class_geometry(5, 10, 2, 8, 0.5)
    for ds, inf in ((train, info), (test, test_info)):
        assert np.array_equal(inf.labels, label_inputs(ds.inputs.numpy(), weights, 2))
    assert not torch.equal(train.inputs[:200], test.inputs[:200])
    assert not torch.equal(train.inputs[:200], transfer.inputs)
    assert len(np.unique(info.labels)) == 10
    assert info.spec == (
        "synthetic:tau=0.5,difficulty=2,seed=5,num_classes=10,superclasses=2,dim=8,"
        "train_samples=400,test_samples=300,transfer_samples=200"
    )


def test_synthetic_difficulty_is_a_dial_from_linear():
    x = np.random.default_rng(0).standard_normal((4000, 32)).astype(np.float32)
    _, weights = class_geometry(0, 20, 4, 32, 0.5)
    linear = (x.astype(np.float64) @ weights.T).argmax(1)
    assert np.array_equal(label_inputs(x, weights, 0), linear)
    agree = [float((label_inputs(x, weights, m) == linear).mean()) for m in (1, 2, 3, 4)]
    assert 1.0 > agree[0] > agree[1] > agree[2] > agree[3] > 0.3


def test_synthetic_defaults():
    _, info = load_dataset("synthetic", "test")
    assert info.spec == (
        "synthetic:tau=0.5,difficulty=2,seed=0,num_classes=20,superclasses=4,dim=32,"
        "train_samples=20000,test_samples=5000,transfer_samples=20000"
    )
    assert info.num_samples == 5000 and info.input_shape == (32,) and info.num_classes == 20
    assert info.preprocessing["sine_a"] == [1.1, 1.2] and info.preprocessing["sine_b"] == [0.0, 0.0]
    assert np.bincount(info.labels, minlength=20).min() > 100  # every class is populated


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:num_classes=10,superclasses=3", r"num_classes=10 must be a multiple of superclasses=3"),
        ("synthetic:tau=1.5", r"synthetic: tau=1.5 must be in \[0, 1\]"),
        ("synthetic:superclasses=10,num_classes=20,dim=4", r"superclasses=10 cannot exceed dim=4"),
    ],
)
def test_synthetic_bad_parameters(spec, message):
    with pytest.raises(SpecError, match=message):
        load_dataset(spec)


# ------------------------------------------------------------------------ torchvision / folders


def test_torchvision_missing_root_never_downloads(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SpecError, match=rf"mnist root {missing} does not exist \(download is never attempted"):
        load_dataset(f"mnist:{missing}")
    with pytest.raises(SpecError, match=r"no cifar10 train data under .*cifar-10-batches-py/"):
        load_dataset(f"cifar10:{tmp_path}")
    assert list(tmp_path.iterdir()) == []  # nothing was written
    with pytest.raises(SpecError, match=r"cifar10 needs a local root directory"):
        load_dataset("cifar10")


def _write_idx(path, array: np.ndarray) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    with open(path, "wb") as handle:
        handle.write(struct.pack(">I", magic))
        handle.write(struct.pack(f">{array.ndim}I", *array.shape))
        handle.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    ds, info = load_dataset(f"mnist:{tmp_path}", "train")
    assert info.num_samples == 12 and info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.spec == f"mnist:{tmp_path}?mean=0.1307&std=0.3081"
    assert np.array_equal(info.labels, np.arange(12) % 10)
    x, y = ds[3]
    assert tuple(x.shape) == (1, 28, 28) and y == 3
    _, test_info = load_dataset(f"mnist:{tmp_path}?mean=0.5&std=0.5", "test")
    assert test_info.num_samples == 5 and test_info.preprocessing["normalize"] == {"mean": [0.5], "std": [0.5]}
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], x)
    with pytest.raises(SpecError, match=r"mnist has no transfer split"):
        load_dataset(f"mnist:{tmp_path}", "transfer")
    with pytest.raises(SpecError, match=r"mean and std need 1 value\(s\) each, got 3 and 1"):
        load_dataset(f"mnist:{tmp_path}?mean=0.1,0.2,0.3", "train")


def _png(path, color) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_imagefolder_splits_preprocessing_and_transfer(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", color)
    _png(tmp_path / "transfer" / "b.png", (0, 255, 0))
    _png(tmp_path / "transfer" / "sub" / "a.png", (255, 255, 255))
    spec = f"imagefolder:{tmp_path}?size=8&crop=6&mean=0.5,0.5,0.5&std=0.5,0.5,0.5"
    train, info = load_dataset(spec, "train")
    assert info.num_samples == 6 and info.num_classes == 2 and info.input_shape == (3, 6, 6)
    assert list(info.labels) == [0, 0, 0, 1, 1, 1]
    x, y = train[0]
    assert tuple(x.shape) == (3, 6, 6) and y == 0
    assert torch.allclose(x[0], torch.ones(6, 6)) and torch.allclose(x[2], -torch.ones(6, 6))  # red
    assert info.spec == f"imagefolder:{tmp_path}?size=8&crop=6&mean=0.5,0.5,0.5&std=0.5,0.5,0.5&num_classes=0"
    _, test_info = load_dataset(spec, "test")
    assert test_info.num_samples == 4
    transfer, transfer_info = load_dataset(spec, "transfer")
    assert transfer_info.labels is None and transfer_info.num_classes == 2 and len(transfer) == 2
    assert transfer.paths[0].endswith("b.png") and transfer[1][1] == -1  # sorted paths
    assert pickle.loads(pickle.dumps(transfer))[0][0].shape == (3, 6, 6)
    with pytest.raises(SpecError, match=r"has no 'val' folder \(it has: train, test, transfer\)"):
        load_dataset(spec, "val")


def test_imagefolder_single_folder_and_errors(tmp_path):
    _png(tmp_path / "a" / "0.png", (1, 2, 3))
    _png(tmp_path / "b" / "0.png", (4, 5, 6))
    _, info = load_dataset(f"imagefolder:{tmp_path}?size=4&crop=4", "test")
    assert info.num_samples == 2 and info.preprocessing["folder"] == "."  # relative: the data may move
    assert info.manifest["classes"] == ["a", "b"] and info.manifest["files"] == 2
    assert info.content_sha256 == info.manifest["content_sha256"]
    with pytest.raises(SpecError, match=r"crop=8 is larger than size=4"):
        load_dataset(f"imagefolder:{tmp_path}?size=4&crop=8")
    with pytest.raises(SpecError, match=r"no labelled sibling folder .* add \?num_classes=N"):
        load_dataset(f"imagefolder:{tmp_path}?size=4&crop=4", "transfer")
    _, tinfo = load_dataset(f"imagefolder:{tmp_path}?size=4&crop=4&num_classes=7", "transfer")
    assert tinfo.num_classes == 7 and tinfo.num_samples == 2
    with pytest.raises(SpecError, match=r"unknown parameter 'resize' \(accepted: size, crop, mean, std, num_classes\)"):
        load_dataset(f"imagefolder:{tmp_path}?resize=4")


def test_dataset_info_equality_compares_labels():
    _, info = load_dataset("digits", "test")
    same = DatasetInfo(**{**info.__dict__, "labels": info.labels.copy()})
    changed = DatasetInfo(**{**info.__dict__, "labels": info.labels[::-1].copy()})
    assert info == same and info != changed
