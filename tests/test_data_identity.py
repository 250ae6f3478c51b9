"""A store follows its data, not its path (issue 19): an ImageFolder moved to another path trains
from its store; a swapped image and a renamed class are refused, naming both; `--allow KIND`
allows that kind of difference only."""

import shutil

import pytest
import torch

from assertions import one_line_error
from test_splits import photo_folder


def _spec(root, size=12):
    return f"imagefolder:{root}?size={size}&crop=12"


@pytest.fixture
def dumped(cli, ray_session, tmp_path):
    from softlabels.models import build_model

    photo_folder(tmp_path / "a" / "train")
    torch.manual_seed(0)
    torch.save(build_model("linear", (3, 12, 12), 2).state_dict(), tmp_path / "t.pt")
    code, out, err = cli("dump", "--teacher", "builtin:linear", "--weights", tmp_path / "t.pt", "--dataset",
                         _spec(tmp_path / "a"), "--out", tmp_path / "s.zarr", "--workers", "1", "--quiet")
    assert code == 0, err
    return tmp_path


def _train(cli, root, store, out, *extra, size=12):
    return cli("train", "--store", store, "--dataset", _spec(root, size), "--student", "builtin:linear", "--method", "kd",
               "--epochs", "1", "--batch-size", "4", "--eval-split", "", "--out", out, "--quiet", *extra)


def test_moved_folder_trains_from_its_store(cli, dumped):
    tmp = dumped
    shutil.move(tmp / "a", tmp / "elsewhere")
    code, out, err = _train(cli, tmp / "elsewhere", tmp / "s.zarr", tmp / "run")
    assert code == 0, err
    assert "warning" not in err
    assert out.startswith("kd: no evaluation split after 1 epoch (")  # --eval-split ''


def test_swapped_image_and_renamed_class_are_refused_naming_both(cli, dumped):
    tmp = dumped
    train = tmp / "a" / "train"
    shutil.copy(train / "cat" / "cat_03.png", train / "cat" / "cat_00.png")
    shutil.move(train / "dog", train / "dogs")
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run"),
                   "changed files: the same 12 file names", "class folders renamed: 'dog' -> 'dogs'",
                   "--allow files --allow classes")
    # --allow preprocessing allows only that
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--allow", "preprocessing"),
                   "changed files", "class folders renamed")
    code, out, err = _train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--allow", "files", "--allow", "classes")
    assert code == 0, err
    assert "warning:" in err and "training anyway (--allow files, classes)" in err


def test_allow_preprocessing_allows_only_preprocessing(cli, dumped):
    tmp = dumped
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", size=14),
                   "preprocessing.resize 12 in the store, 14 here", "--allow preprocessing")
    code, out, err = _train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--allow", "preprocessing", size=14)
    assert code == 0, err
    assert "preprocessing.resize 12 in the store, 14 here" in err
    shutil.copy(tmp / "a" / "train" / "dog" / "dog_01.png", tmp / "a" / "train" / "dog" / "dog_00.png")
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--allow", "preprocessing", size=14),
                   "changed files", "--allow files")
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--allow", "everything"),
                   "--allow everything: unknown kind", "spec, preprocessing, labels, files, classes, teacher")


def test_train_reports_val_accuracy_and_needs_holdout_without_splits(cli, dumped):
    import json

    tmp = dumped
    photo_folder(tmp / "a" / "val", per_class=3, seed=1)
    code, out, err = cli("train", "--store", tmp / "s.zarr", "--dataset", _spec(tmp / "a"), "--student", "builtin:linear",
                         "--method", "kd", "--epochs", "1", "--batch-size", "4", "--out", tmp / "run", "--quiet")
    assert code == 0, err
    assert out.startswith("kd: val accuracy ")
    # --views next on a store with one view per sample picks nothing: refused
    one_line_error(*_train(cli, tmp / "a", tmp / "s.zarr", tmp / "run", "--views", "next"),
                   "--views next picks one of several stored views", "hold one view per sample")
    # a folder without split folders: its one pool is the training data
    flat = tmp / "flat"
    photo_folder(flat, per_class=8, seed=2)
    code, _, err = cli("dump", "--teacher", "builtin:linear", "--weights", tmp / "t.pt", "--dataset", _spec(flat),
                       "--out", tmp / "flat.zarr", "--workers", "1", "--quiet")
    assert code == 0, err
    args = ("train", "--store", tmp / "flat.zarr", "--dataset", _spec(flat), "--student", "builtin:linear",
            "--method", "kd", "--epochs", "1", "--batch-size", "4", "--quiet")
    one_line_error(*cli(*args, "--out", tmp / "r1"), "has no held-out split", "--holdout 0.1")
    code, out, err = cli(*args, "--holdout", "0.25", "--out", tmp / "r2")
    assert code == 0, err
    assert out.startswith("kd: holdout accuracy ")
    metrics = json.loads((tmp / "r2" / "metrics.json").read_text())
    assert metrics["eval_split"] == "holdout"
    assert metrics["holdout"] == {"fraction": 0.25, "seed": 0, "held_out": 4, "train": 12}
