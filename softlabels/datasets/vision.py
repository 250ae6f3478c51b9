"""Image datasets read from a local directory; softlabels never downloads anything.

torchvision datasets -- ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``, ``kmnist``,
``svhn`` -- as ``name:/root[?mean=...&std=...]``: the directory torchvision would have
downloaded into (e.g. ``/root/cifar-10-batches-py``); ``download=False`` always. Splits
``train``/``test`` (svhn also ``extra``). Eval preprocessing: ``ToTensor`` + ``Normalize`` with
the dataset's usual channel statistics unless ``mean``/``std`` are given.

``imagefolder:/root[?size=256&crop=224&mean=...&std=...&num_classes=N]``: torchvision
``ImageFolder`` (one sub-folder per class, classes sorted by name). Eval preprocessing:
``Resize(size)`` (shorter side, bilinear, antialiased) + ``CenterCrop(crop)`` + ``ToTensor`` +
``Normalize(mean, std)`` (ImageNet statistics by default); images are converted to RGB.
Split folders: when ``/root/<split>`` exists it is used; when the root has none of ``train``,
``val``, ``test``, ``transfer``, the root itself serves every split (e.g. to dump a teacher over
one folder). The ``transfer`` split is unlabeled: every image file under its folder, recursively,
in sorted path order; its class count comes from a labelled sibling folder (``train``, ``val``,
``test``) or from ``num_classes=N``. Every imagefolder split is an :class:`ImageFiles`, which also
hands augmentation policies the raw decoded image (``dump --augment crop-flip``; crop boxes are in
the file's own pixels, see docs/FORMAT.md section 7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.datasets.info import DatasetInfo
from softlabels.datasets.manifest import folder_manifest
from softlabels.datasets.spec import Param, check_split, format_params, parse_params, positive, split_path_query
from softlabels.errors import SpecError

__all__ = ["TORCHVISION", "load_torchvision", "load_imagefolder", "ImageFiles"]


@dataclass(frozen=True)
class _Torchvision:
    cls: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str  # what torchvision expects under the root, for the error message
    splits: tuple[str, ...] = ("train", "test")


TORCHVISION = {
    "cifar10": _Torchvision("CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py/"),
    "cifar100": _Torchvision("CIFAR100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python/"),
    "mnist": _Torchvision("MNIST", 1, 28, 10, (0.1307,), (0.3081,), "MNIST/raw/"),
    "fashionmnist": _Torchvision("FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,), "FashionMNIST/raw/"),
    "kmnist": _Torchvision("KMNIST", 1, 28, 10, (0.1918,), (0.3483,), "KMNIST/raw/"),
    "svhn": _Torchvision(
        "SVHN", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "<split>_32x32.mat",
        ("train", "test", "extra"),
    ),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_DIRS = ("train", "val", "test", "transfer")


def _require_root(name: str, root: str) -> None:
    if not os.path.isdir(root):
        raise SpecError(f"{name} root {root} does not exist (download is never attempted; point to a local copy)")


def _normalize(name: str, mean: tuple[float, ...], std: tuple[float, ...], channels: int):
    from torchvision import transforms

    if len(mean) != channels or len(std) != channels:
        raise SpecError(f"{name}: mean and std need {channels} value(s) each, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise SpecError(f"{name}: std values must be > 0")
    return transforms.Normalize(mean, std)


def load_torchvision(name: str, rest: str, split: str) -> tuple[torch.utils.data.Dataset, DatasetInfo]:
    import torchvision
    from torchvision import transforms

    entry = TORCHVISION[name]
    root, query = split_path_query(name, rest)
    schema = {"mean": Param("floats", entry.mean), "std": Param("floats", entry.std)}
    params = parse_params(name, query, schema, sep="&")
    if split == "transfer":
        raise SpecError(
            f"{name} has no transfer split (available: {', '.join(entry.splits)}); use another "
            "labelled split or an imagefolder:/path with a transfer/ folder for unlabeled data"
        )
    check_split(name, split, entry.splits)
    _require_root(name, root)
    transform = transforms.Compose(
        [transforms.ToTensor(), _normalize(name, params["mean"], params["std"], entry.channels)]
    )
    cls = getattr(torchvision.datasets, entry.cls)
    split_kwargs: dict[str, Any] = {"split": split} if name == "svhn" else {"train": split == "train"}
    try:
        dataset = cls(root, transform=transform, download=False, **split_kwargs)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        layout = entry.layout.replace("<split>", split)
        raise SpecError(
            f"no {name} {split} data under {root} (expected torchvision's layout {root}/{layout}; "
            f"torchvision said: {str(exc).split('.')[0]}; download is never attempted)"
        ) from None
    labels = np.asarray(getattr(dataset, "targets", None) if name != "svhn" else dataset.labels, dtype=np.int64)
    info = DatasetInfo(
        spec=f"{name}:{root}?{format_params(params, sep='&')}",
        split=split,
        num_samples=len(dataset),
        num_classes=entry.num_classes,
        input_shape=(entry.channels, entry.size, entry.size),
        labels=labels,
        preprocessing={
            "name": name,
            "to_tensor": "uint8 -> [0, 1]",
            "normalize": {"mean": list(params["mean"]), "std": list(params["std"])},
        },
        content_sha256=None,
    )
    return dataset, info


class ImageFiles(torch.utils.data.Dataset):
    """Images from an explicit, sorted list of paths; item ``i`` is ``(transform(image), label)``
    (label -1 when unlabeled).

    Also gives augmentation policies (:mod:`softlabels.augment`) the raw decoded image
    (:meth:`raw_image`, uint8 ``[3, H, W]``), its size without decoding (:meth:`image_size`) and
    the eval normalisation (:meth:`finish_image`), so a crop box in source pixels can be applied
    identically at dump and at training time.
    """

    def __init__(
        self,
        paths: list[str],
        transform,
        labels: list[int] | None = None,
        *,
        crop_size: tuple[int, int] = (224, 224),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.labels = None if labels is None else [int(y) for y in labels]
        self.crop_size = tuple(crop_size)
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import pil_loader

        label = -1 if self.labels is None else self.labels[index]
        return self.transform(pil_loader(self.paths[index])), label

    def raw_image(self, index: int) -> torch.Tensor:
        """The decoded RGB image as uint8 ``[3, H, W]`` (PIL decode, as the eval path)."""
        from torchvision.datasets.folder import pil_loader
        from torchvision.transforms.v2 import functional as F

        return F.pil_to_tensor(pil_loader(self.paths[index]))

    def eval_image(self, image: torch.Tensor) -> torch.Tensor:
        """The evaluation input (this dataset's ``transform``) of a decoded uint8 ``[3, H, W]``
        image: exactly ``self[i][0]`` for ``image = raw_image(i)``."""
        from torchvision.transforms.v2 import functional as F

        return self.transform(F.to_pil_image(image))

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the file header, without decoding the pixels."""
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            width, height = img.size
        return int(height), int(width)

    def finish_image(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, h, w]`` -> float32 in [0, 1] -> Normalize(mean, std): the eval path's tail."""
        from torchvision.transforms.v2 import functional as F

        return F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)


def _image_files(folder: str) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return sorted(found)


IMAGEFOLDER_SCHEMA = {
    "size": Param("int", 256, positive, maximum=8192),
    "crop": Param("int", 224, positive, maximum=8192),
    "mean": Param("floats", IMAGENET_MEAN),
    "std": Param("floats", IMAGENET_STD),
    "num_classes": Param(
        "int", 0, lambda v: None if v >= 0 else "must be >= 0 (0: take it from the class folders)", maximum=1_000_000
    ),
}


def _split_folder(root: str, split: str) -> str:
    present = [d for d in SPLIT_DIRS if os.path.isdir(os.path.join(root, d))]
    if split in present:
        return os.path.join(root, split)
    if present:
        raise SpecError(f"imagefolder root {root} has no '{split}' folder (it has: {', '.join(present)})")
    return root


def _class_count(folder: str) -> int:
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(folder)[0])
    except FileNotFoundError:
        return 0


def load_imagefolder(rest: str, split: str) -> tuple[torch.utils.data.Dataset, DatasetInfo]:
    from torchvision import datasets, transforms

    name = "imagefolder"
    root, query = split_path_query(name, rest)
    params = parse_params(name, query, IMAGEFOLDER_SCHEMA, sep="&")
    if params["crop"] > params["size"]:
        raise SpecError(f"{name}: crop={params['crop']} is larger than size={params['size']}")
    _require_root(name, root)
    folder = _split_folder(root, split)
    transform = transforms.Compose(
        [
            transforms.Resize(params["size"], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(params["crop"]),
            transforms.ToTensor(),
            _normalize(name, params["mean"], params["std"], 3),
        ]
    )
    dataset: torch.utils.data.Dataset
    raw_kwargs = {"crop_size": (params["crop"], params["crop"]), "mean": params["mean"], "std": params["std"]}
    if split == "transfer":
        paths = _image_files(folder)
        if not paths:
            raise SpecError(f"imagefolder: no image files under {folder}")
        num_classes = params["num_classes"]
        if not num_classes:
            siblings = [os.path.join(root, d) for d in ("train", "val", "test") if os.path.isdir(os.path.join(root, d))]
            num_classes = next((c for c in map(_class_count, siblings) if c), 0)
        if not num_classes:
            raise SpecError(
                f"imagefolder: the transfer split under {root} has no labelled sibling folder to take the "
                "class count from; add ?num_classes=N to the spec"
            )
        dataset, labels = ImageFiles(paths, transform, **raw_kwargs), None
        manifest = folder_manifest(folder, paths, None, None)
    else:
        try:
            folder_data = datasets.ImageFolder(folder)
        except FileNotFoundError as exc:
            raise SpecError(f"imagefolder: {exc} (expected one sub-folder of images per class)") from None
        labels = np.asarray(folder_data.targets, dtype=np.int64)
        num_classes = len(folder_data.classes)
        dataset = ImageFiles([path for path, _ in folder_data.samples], transform, labels.tolist(), **raw_kwargs)
        if params["num_classes"] and params["num_classes"] != num_classes:
            raise SpecError(
                f"imagefolder: num_classes={params['num_classes']} but {folder} has {num_classes} class folders"
            )
        manifest = folder_manifest(folder, dataset.paths, labels.tolist(), folder_data.classes)
    info = DatasetInfo(
        spec=f"{name}:{root}?{format_params(params, sep='&')}",
        split=split,
        num_samples=len(dataset),
        num_classes=num_classes,
        input_shape=(3, params["crop"], params["crop"]),
        labels=labels,
        preprocessing={
            "name": name,
            "folder": os.path.relpath(folder, root),  # the split folder under the root: "train", or "." (no splits)
            "convert": "RGB",
            "resize": params["size"],
            "interpolation": "bilinear",
            "antialias": True,
            "center_crop": params["crop"],
            "to_tensor": "uint8 -> [0, 1]",
            "normalize": {"mean": list(params["mean"]), "std": list(params["std"])},
        },
        content_sha256=manifest["content_sha256"],
        manifest=manifest,
    )
    return dataset, info
