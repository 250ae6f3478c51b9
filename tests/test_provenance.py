"""Provenance is checked when training starts: a store only trains with the dataset it was dumped
from. Every difference is named with the store's value and this run's value; `--allow KIND`
lets the soft ones through with a visible warning and records them in metrics.json; a different
sample or class count is refused even then (targets would not line up with the rows / outputs)."""

import json

import numpy as np
import pytest

from assertions import one_line_error

from softlabels.datasets import load_dataset
from softlabels.data import DistillDataset, StoreDatasetMismatchError, store_dataset_metadata
from softlabels.stores import format as fmt
from softlabels.stores.metadata import labels_fingerprint
from softlabels.stores.from_logits import write_store_from_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS = "digits:seed=0,test_samples=360"  # the canonical spec of `digits`


def _dump(path, spec, split="train", **dataset_overrides):
    """A store for one split of ``spec`` with teacher-like logits, recording that split's identity
    (``dataset_overrides`` replace recorded fields, e.g. another preprocessing)."""
    _, info = load_dataset(spec, split)
    g = np.random.default_rng(0)
    logits = g.normal(0, 1.0, (info.num_samples, info.num_classes)).astype(np.float32)
    if info.labels is not None:
        logits[np.arange(info.num_samples), info.labels] += 4.0
    write_store_from_logits(
        path, logits, k=3, temperatures=(1.0, 4.0), labels=info.labels,
        teacher={"spec": "test:logits", "checkpoint_sha256": "0" * 64, "num_classes": info.num_classes},
        dataset={**store_dataset_metadata(info), **dataset_overrides},
    )
    return path, info


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return _dump(tmp_path_factory.mktemp("prov") / "digits.zarr", "digits")


def _train(cli, store, dataset, out, *extra):
    return cli("train", "--store", store, "--dataset", dataset, "--method", "kd-topk", "--epochs", "1",
               "--quiet", "--out", out, *extra)


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_matching_dataset_trains_and_records_no_mismatch(cli, digits_store, tmp_path):
    store, _ = digits_store
    code, out, err = _train(cli, store, "digits", tmp_path / "run")
    assert code == 0, err
    assert "warning" not in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["allowed_mismatch"] == [] and metrics["warnings"] == []


def test_other_seed_of_a_builtin_is_refused_then_allowed_with_warning(cli, digits_store, tmp_path):
    store, info = digits_store
    _, other = load_dataset("digits:seed=1", "train")
    stored_fp, here_fp = labels_fingerprint(info.labels), labels_fingerprint(other.labels)
    differences = (
        f"spec '{DIGITS}' in the store, 'digits:seed=1,test_samples=360' here; "
        f"labels_sha256 {stored_fp[:12]} in the store, {here_fp[:12]} here (labels differ in value or order); "
        f"content_sha256 {info.content_sha256[:12]} in the store, {other.content_sha256[:12]} here (inputs differ)"
    )
    code, _, err = _train(cli, store, "digits:seed=1", tmp_path / "refused")
    assert code == 2
    assert _one_error_line(err) == (
        f"error: store {store} does not match this run's dataset: {differences}; train on the dataset the store "
        "was dumped from, or pass --allow spec --allow labels --allow files to train anyway"
    )
    assert not (tmp_path / "refused" / "metrics.json").exists()
    one_line_error(*_train(cli, store, "digits:seed=1", tmp_path / "refused", "--allow", "spec"), "--allow labels --allow files")

    code, out, err = _train(cli, store, "digits:seed=1", tmp_path / "allowed", "--allow", "spec", "--allow", "labels,files")
    assert code == 0, err
    assert f"warning: store {store} does not match this run's dataset: {differences}; training anyway " \
           "(--allow spec, labels, files)" in " ".join(err.split())
    metrics = json.loads((tmp_path / "allowed" / "metrics.json").read_text())
    assert metrics["allowed_mismatch"] == [
        {"store": str(store), "field": "spec", "kind": "spec", "store_value": DIGITS,
         "run_value": "digits:seed=1,test_samples=360"},
        {"store": str(store), "field": "labels_sha256", "kind": "labels", "store_value": stored_fp, "run_value": here_fp,
         "note": "labels differ in value or order"},
        {"store": str(store), "field": "content_sha256", "kind": "files", "store_value": info.content_sha256,
         "run_value": other.content_sha256, "note": "inputs differ"},
    ]
    assert len(metrics["warnings"]) == 1 and "does not match this run's dataset" in metrics["warnings"][0]


def test_other_preprocessing_is_refused_then_allowed(cli, tmp_path):
    recorded = {"name": "digits", "scale": "pixel / 255 -> [0, 1]", "layout": "(1, 8, 8)"}
    store, info = _dump(tmp_path / "pre.zarr", "digits", preprocessing=recorded)
    difference = "preprocessing.scale 'pixel / 255 -> [0, 1]' in the store, 'pixel / 16 -> [0, 1]' here"
    code, _, err = _train(cli, store, "digits", tmp_path / "refused")
    assert code == 2
    assert _one_error_line(err) == (
        f"error: store {store} does not match this run's dataset: {difference}; train on the dataset the store "
        "was dumped from, or pass --allow preprocessing to train anyway"
    )
    code, _, err = _train(cli, store, "digits", tmp_path / "allowed", "--allow", "preprocessing")
    assert code == 0, err
    assert f"does not match this run's dataset: {difference}; training anyway (--allow preprocessing)" in " ".join(err.split())
    metrics = json.loads((tmp_path / "allowed" / "metrics.json").read_text())
    assert metrics["allowed_mismatch"] == [
        {"store": str(store), "field": "preprocessing.scale", "kind": "preprocessing",
         "store_value": "pixel / 255 -> [0, 1]", "run_value": "pixel / 16 -> [0, 1]"}
    ]


def test_other_size_of_a_builtin_is_refused_even_when_allowed(cli, digits_store, tmp_path):
    store, _ = digits_store
    for extra in ((), ("--allow", "spec,preprocessing,labels,files,classes,teacher")):
        code, _, err = _train(cli, store, "digits:test_samples=400", tmp_path / "o", *extra)
        assert code == 2
        assert _one_error_line(err) == (
            f"error: store {store} does not match this run's dataset: num_samples 1437 in the store, 1397 here; "
            f"spec '{DIGITS}' in the store, 'digits:seed=0,test_samples=400' here; a different sample or class "
            "count cannot be overridden (store rows or targets would not fit); train on the dataset the store "
            "was dumped from, or re-dump the store for this one"
        )
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_other_class_count_is_refused_even_when_allowed(cli, tmp_path):
    sizes = "train_samples=400,test_samples=100"
    store, _ = _dump(tmp_path / "c12.zarr", f"synthetic:num_classes=12,{sizes}")
    for extra in ((), ("--allow", "spec,preprocessing,labels,files,classes,teacher")):
        code, _, err = _train(cli, store, f"synthetic:num_classes=8,{sizes}", tmp_path / "o", *extra)
        assert code == 2
        line = _one_error_line(err)
        assert line.startswith(
            f"error: store {store} does not match this run's dataset: num_classes 12 in the store, 8 here; spec "
        )
        assert line.endswith("a different sample or class count cannot be overridden (store rows or targets would "
                             "not fit); train on the dataset the store was dumped from, or re-dump the store for this one")


def test_other_split_is_named(tmp_path):
    """`softlabels train` always loads the split a store records (so the CLI cannot pair a store
    with another split); through the library a same-sized other split is named and refused."""
    spec = "mnist1d:num_samples=400,train_split=0.5"
    store, info = _dump(tmp_path / "train.zarr", spec, "train")
    test_ds, test_info = load_dataset(spec, "test")
    assert test_info.num_samples == info.num_samples == 200
    with pytest.raises(StoreDatasetMismatchError) as e:
        DistillDataset(test_ds, store, info=test_info, fields=[fmt.TOPK_VALUES])
    assert f"store {store} does not match this run's dataset: split 'train' in the store, 'test' here; " in str(e.value)
    assert "labels_sha256 " in str(e.value) and "content_sha256 " in str(e.value)
    data = DistillDataset(test_ds, store, info=test_info, fields=[fmt.TOPK_VALUES], allow_mismatch=True)
    assert data.warnings[0].endswith("; training anyway (--allow spec, labels, files)")


def test_cli_trains_each_store_on_the_split_it_records(cli, tmp_path):
    store, _ = _dump(tmp_path / "test.zarr", "digits", "test")
    # its only held-out split is the one it trains on: evaluating there would report training accuracy
    one_line_error(*_train(cli, store, "digits", tmp_path / "run"), "training on the test split of digits leaves no "
                   "held-out split", "--holdout 0.1")
    code, _, err = _train(cli, store, "digits", tmp_path / "run", "--eval-split", "")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_splits"] == ["test"] and metrics["train_samples"] == 360
    assert metrics["allowed_mismatch"] == []
