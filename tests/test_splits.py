"""Splits for common layouts (issue 19): an ImageNet-style train/ + val/ folder is evaluated on
val; a folder without split folders is refused unless --holdout holds out a seeded part of train;
training accuracy is never reported as held-out accuracy."""

import numpy as np
import pytest

from softlabels.datasets import load_dataset
from softlabels.datasets.splits import available_splits, choose_eval_split, holdout
from softlabels.errors import SpecError

from assertions import one_line_error


def photo_folder(root, per_class=6, classes=("cat", "dog"), seed=0):
    """Real photo crops (sklearn's sample images), one folder per class: class 0 from one photo,
    class 1 from the other, so that a tiny model can tell them apart."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[c % 2]
            h, w = int(rng.integers(24, 40)), int(rng.integers(24, 40))
            y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
            Image.fromarray(photo[y : y + h, x : x + w]).save(root / name / f"{name}_{i:02d}.png")
    return root


def _spec(root):
    return f"imagefolder:{root}?size=12&crop=12"


def test_train_val_folder_reports_val_accuracy(cli, tmp_path):
    photo_folder(tmp_path / "imgs" / "train", seed=0)
    photo_folder(tmp_path / "imgs" / "val", per_class=3, seed=1)
    spec = _spec(tmp_path / "imgs")
    assert available_splits(spec) == ("train", "val")
    code, out, err = cli("teacher", "fit", "--dataset", spec, "--arch", "linear", "--epochs", "2",
                         "--out", tmp_path / "t.pt", "--quiet")
    assert code == 0, err
    assert out.startswith("val accuracy ") and "(train " in out
    code, out, err = cli("teacher", "fit", "--dataset", spec, "--arch", "linear", "--epochs", "2", "--eval-split", "val",
                         "--out", tmp_path / "t.pt", "--quiet")
    assert code == 0 and out.startswith("val accuracy "), err
    one_line_error(*cli("teacher", "fit", "--dataset", spec, "--eval-split", "test", "--out", tmp_path / "t.pt"),
                   "has no split 'test'", "available: train, val")
    one_line_error(*cli("teacher", "fit", "--dataset", spec, "--eval-split", "train", "--out", tmp_path / "t.pt"),
                   "is the training split")


def test_folder_without_splits_needs_holdout(cli, tmp_path):
    root = photo_folder(tmp_path / "pool", per_class=8)
    spec = _spec(root)
    assert available_splits(spec) == ()
    one_line_error(*cli("teacher", "fit", "--dataset", spec, "--out", tmp_path / "t.pt"),
                   "has no held-out split", "--holdout 0.1")
    one_line_error(*cli("teacher", "fit", "--dataset", spec, "--eval-split", "val", "--out", tmp_path / "t.pt"),
                   "has no held-out split")
    code, out, err = cli("teacher", "fit", "--dataset", spec, "--arch", "linear", "--epochs", "2", "--holdout", "0.25",
                         "--out", tmp_path / "t.pt")
    assert code == 0, err
    assert out.startswith("holdout accuracy ")
    assert "evaluating on holdout (4 of 16 train samples, seed 0)" in err
    one_line_error(*cli("teacher", "fit", "--dataset", spec, "--holdout", "1.5", "--out", tmp_path / "t.pt"),
                   "--holdout must be a fraction between 0 and 1")


def test_holdout_is_seeded_and_disjoint():
    dataset, _ = load_dataset("digits", "train")
    a, b = holdout(dataset, 0.1, seed=3), holdout(dataset, 0.1, seed=3)
    np.testing.assert_array_equal(a.held_out_index, b.held_out_index)
    assert a.held_out_index.size == 144 and a.train_index.size == 1437 - 144
    assert not set(a.held_out_index) & set(a.train_index)
    assert len(a.train) == 1293 and a.train.inputs.shape[0] == 1293  # in-memory stays in memory
    assert not np.array_equal(holdout(dataset, 0.1, seed=4).held_out_index, a.held_out_index)


def test_builtin_eval_split_defaults_to_test():
    assert choose_eval_split("mnist1d", "train", None, None) == "test"
    assert choose_eval_split("digits", "train", None, 0.2) is None
    with pytest.raises(SpecError, match="exclude each other"):
        choose_eval_split("digits", "train", "test", 0.2)
