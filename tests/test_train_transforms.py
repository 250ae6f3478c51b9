"""The student's training view of torchvision array datasets (cifar10/cifar100/svhn): the CIFAR
recipe, pad 4 + random crop + horizontal flip, on a CIFAR-10 root in torchvision's own layout
made of real photo crops (scikit-learn's sample photos)."""

import pickle  # torchvision's CIFAR files are Python pickles: this writes that dataset's own layout

import numpy as np
import pytest
import torch

from softlabels.datasets import load_dataset
from softlabels.train_transforms import PadCropFlipTrain, train_transform_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo_crops(n: int) -> np.ndarray:
    """n real-photo crops, uint8 [n, 32, 32, 3], from scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        out[i] = photo[top : top + 32, left : left + 32]
    return out


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A CIFAR-10 root (cifar-10-batches-py/) of 5 x 8 train and 10 test images; torchvision's md5
    check of the real files is switched off for it."""
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = _photo_crops(50)
    labels = [i % 10 for i in range(50)]
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = images[b * 8 : (b + 1) * 8] if b < 5 else images[40:]
        rows = part.transpose(0, 3, 1, 2).reshape(len(part), -1)  # CIFAR's [N, 3072] channel-major rows
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": labels[b * 8 : b * 8 + len(part)] if b < 5 else labels[40:]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path


def test_cifar_gets_the_cifar_recipe_and_its_identity_view_is_the_eval_input(cifar_root):
    ds, info = load_dataset(f"cifar10:{cifar_root}", "train")
    assert info.num_samples == 40
    view = train_transform_for(ds, info.input_shape, True, info)
    assert isinstance(view, PadCropFlipTrain) and view.flip == 0.5 and view.padding == 4
    assert train_transform_for(ds, info.input_shape, False, info) is None  # --no-aug
    index = np.arange(40)
    identity = PadCropFlipTrain(info.preprocessing["normalize"]["mean"], info.preprocessing["normalize"]["std"],
                                padding=0, flip=0.0)
    assert torch.equal(identity.build(ds, index, 0, 0), torch.stack([ds[i][0] for i in index]))


def test_every_view_is_a_shifted_or_mirrored_window_drawn_per_seed_epoch_sample(cifar_root):
    ds, info = load_dataset(f"cifar10:{cifar_root}", "train")
    view = train_transform_for(ds, info.input_shape, True, info)
    index = np.arange(40)
    x = view.build(ds, index, 0, 0)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, view.build(ds, index, 0, 0))  # replayable
    assert torch.equal(x[5:9], view.build(ds, index[5:9], 0, 0))  # independent of the batch it is in
    assert not torch.equal(x, view.build(ds, index, 0, 1)) and not torch.equal(x, view.build(ds, index, 1, 0))
    mean = torch.tensor(info.preprocessing["normalize"]["mean"]).view(3, 1, 1)
    std = torch.tensor(info.preprocessing["normalize"]["std"]).view(3, 1, 1)
    found = []
    for i in index:
        padded = torch.nn.functional.pad(torch.from_numpy(ds.data[i].transpose(2, 0, 1).copy()), (4, 4, 4, 4))
        candidates = [
            (dy, dx, flip)
            for dy in range(9) for dx in range(9) for flip in (False, True)
            if torch.allclose(x[i], ((lambda w: w.flip(-1) if flip else w)(padded[:, dy:dy + 32, dx:dx + 32]).float()
                                     / 255 - mean) / std, atol=1e-6)
        ]
        assert candidates, f"view of sample {i} is no padded window"
        found.append(candidates[0])
    flips = sum(f for _, _, f in found)
    assert 8 <= flips <= 32  # p = 0.5 over 40 samples
    assert len({(dy, dx) for dy, dx, _ in found}) > 20  # offsets vary over the 81 positions


def test_cifar_student_trains_on_the_cifar_recipe_through_the_cli(cifar_root, tmp_path, cli):
    out = tmp_path / "run"
    code, stdout, stderr = cli("train", "--dataset", f"cifar10:{cifar_root}", "--student", "torchvision:resnet18",
                               "--method", "ce", "--epochs", "1", "--batch-size", "20", "--quiet", "--out", out)
    assert code == 0, stderr
    assert stdout.startswith("ce: test accuracy ") and " after 1 epoch (" in stdout
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["train_transform"] == "pad-crop+flip"
    assert metrics["eval_split"] == "test" and 0.0 <= metrics["test_accuracy"] <= 1.0
