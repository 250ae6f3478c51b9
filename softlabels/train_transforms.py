"""The student's training view of image datasets.

* ``imagefolder`` (files of any size): torchvision's classification recipe,
  ``RandomResizedCrop(crop, scale=(0.08, 1))`` + ``RandomHorizontalFlip()``, applied to the raw
  decoded image, then the dataset's own normalisation -- the same algorithm and code as the
  dump's ``crop-flip`` policy (:class:`softlabels.augment.CropFlip`).
* ``cifar10`` / ``cifar100`` / ``svhn`` (32 x 32 arrays): the CIFAR recipe of torchvision's and
  pytorch-cifar's scripts, ``RandomCrop(32, padding=4)`` (zero fill) + ``RandomHorizontalFlip()``;
  svhn without the flip (digits are not mirror-symmetric).
* ``mnist``-style digits and non-image datasets train on their eval preprocessing.

Every parameter is drawn from a counter-based RNG keyed by (seed, epoch, sample), so it does
not depend on worker count, batch order or resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from softlabels.augment import CropFlip, counter_uniform

__all__ = ["CropFlipTrain", "PadCropFlipTrain", "train_transform_for"]

# torchvision array datasets with the CIFAR recipe: name -> flip probability
PAD_CROP_DATASETS = {"cifar10": 0.5, "cifar100": 0.5, "svhn": 0.0}


class CropFlipTrain:
    """``build(dataset, index, seed, epoch) -> [n, C, crop, crop]``: a fresh random-resized crop
    and flip per (seed, epoch, sample)."""

    name = "random-resized-crop+flip"

    def __init__(self, min_scale: float = 0.08, flip: float = 0.5) -> None:
        params = {key: p.default for key, p in CropFlip.schema.items()}
        params.update(min_scale=float(min_scale), flip=float(flip))
        self.policy = CropFlip(params)

    def build(self, dataset: Any, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        key = int(counter_uniform((seed, epoch, 0x7EA1), np.zeros(1, dtype=np.int64), 1)[0, 0] >> np.uint64(1))
        params = self.policy.sample(key, index, 1, dataset)
        return self.policy.build(dataset, index, {name: arr[:, 0] for name, arr in params.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.policy.params}


class PadCropFlipTrain:
    """``build(dataset, index, seed, epoch) -> [n, C, H, W]``: zero-pad by ``padding``, a random
    H x W crop, a horizontal flip with probability ``flip``, then ``(x / 255 - mean) / std`` --
    on the uint8 arrays of a torchvision dataset (``dataset.data``: CIFAR's ``[N, H, W, C]`` or
    SVHN's ``[N, C, H, W]``). With the crop at offset ``padding`` and no flip it is exactly the
    eval input (``ToTensor`` + ``Normalize``)."""

    name = "pad-crop+flip"

    def __init__(self, mean, std, padding: int = 4, flip: float = 0.5) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.padding, self.flip = int(padding), float(flip)

    def build(self, dataset: Any, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        raw = np.asarray(dataset.data[index])
        if raw.shape[-1] in (1, 3) and raw.shape[1] not in (1, 3):  # [n, H, W, C] -> [n, C, H, W]
            raw = raw.transpose(0, 3, 1, 2)
        images = torch.from_numpy(np.ascontiguousarray(raw))
        n, _, height, width = images.shape
        p = self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))  # zero fill, as RandomCrop(padding=p)
        words = counter_uniform((seed, epoch, 0xC1FA), index, 3)
        dy = (words[:, 0] % np.uint64(2 * p + 1)).astype(np.int64)
        dx = (words[:, 1] % np.uint64(2 * p + 1)).astype(np.int64)
        flip = (words[:, 2] >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.flip
        out = torch.empty((n, images.shape[1], height, width), dtype=torch.uint8)
        for r in range(n):
            crop = padded[r, :, dy[r] : dy[r] + height, dx[r] : dx[r] + width]
            out[r] = crop.flip(-1) if flip[r] else crop
        return (out.float() / 255.0 - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "padding": self.padding, "flip": self.flip}


def train_transform_for(
    dataset: Any, input_shape: tuple[int, ...], enabled: bool, info: Any = None
) -> CropFlipTrain | PadCropFlipTrain | None:
    """The training view for ``dataset`` (see the module docstring), unless disabled
    (``--no-aug``); None for datasets that train on their eval preprocessing."""
    if not enabled or len(tuple(input_shape)) != 3:
        return None
    if all(callable(getattr(dataset, name, None)) for name in ("raw_image", "image_size", "finish_image")):
        return CropFlipTrain()
    pre = getattr(info, "preprocessing", None) or {}
    if pre.get("name") in PAD_CROP_DATASETS and hasattr(dataset, "data"):
        norm = pre["normalize"]
        return PadCropFlipTrain(norm["mean"], norm["std"], flip=PAD_CROP_DATASETS[pre["name"]])
    return None
