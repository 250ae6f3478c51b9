"""Identity of image folders by content (issue 19): the same files at another path have the same
manifest; a swapped image and a renamed class are told apart; digests are cached beside the data."""

import os
import shutil

from softlabels.datasets import load_dataset, manifest
from softlabels.datasets.manifest import CACHE_NAME, manifest_differences

from test_splits import photo_folder


def _info(root, split="train"):
    return load_dataset(f"imagefolder:{root}?size=12&crop=12", split)[1]


def test_same_files_at_another_path_have_the_same_manifest(tmp_path, monkeypatch):
    photo_folder(tmp_path / "a" / "train")
    first = _info(tmp_path / "a")
    assert first.manifest["classes"] == ["cat", "dog"] and first.manifest["class_files"] == [6, 6]
    assert (tmp_path / "a" / "train" / CACHE_NAME).exists()
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")  # keeps mtimes: the cache applies
    os.remove(tmp_path / "elsewhere" / "b" / "train" / CACHE_NAME)  # ... and without it, rehashed
    calls = []
    hash_file = manifest._sha256_file
    monkeypatch.setattr(manifest, "_sha256_file", lambda p: calls.append(p) or hash_file(p))
    moved = _info(tmp_path / "elsewhere" / "b")
    assert moved.manifest == first.manifest and moved.content_sha256 == first.content_sha256
    assert len(calls) == 12
    assert moved.preprocessing == first.preprocessing  # no absolute folder in the identity
    calls.clear()
    assert _info(tmp_path / "elsewhere" / "b").manifest == first.manifest and calls == []  # cached


def test_swapped_image_and_renamed_class_are_both_named(tmp_path):
    photo_folder(tmp_path / "d" / "train")
    before = _info(tmp_path / "d").manifest
    train = tmp_path / "d" / "train"
    shutil.copy(train / "cat" / "cat_01.png", train / "cat" / "cat_00.png")  # one image swapped
    os.rename(train / "dog", train / "dogs")  # one class renamed (same order)
    after = _info(tmp_path / "d").manifest
    kinds = dict(manifest_differences(before, after))
    assert kinds["classes"] == "class folders renamed: 'dog' -> 'dogs'"
    assert kinds["files"].startswith("changed files: the same 12 file names with other")
    os.remove(train / "cat" / "cat_02.png")
    kinds = dict(manifest_differences(before, _info(tmp_path / "d").manifest))
    assert kinds["files"] == "missing or extra files: 12 files in the store, 11 here (cat: 6 in the store, 5 here)"
