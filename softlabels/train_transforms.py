"""The student's training view of image datasets: RandomResizedCrop + horizontal flip.

torchvision's classification recipe (``RandomResizedCrop(crop, scale=(0.08, 1))`` +
``RandomHorizontalFlip()``) applied to the raw decoded image, then the dataset's own
normalisation. The parameters are drawn from a counter-based RNG keyed by (seed, epoch, sample)
-- the same algorithm and code as the dump's ``crop-flip`` policy (:class:`softlabels.augment.CropFlip`)
-- so they do not depend on worker count, batch order or resume. Datasets that do not expose
raw images (``raw_image``/``image_size``/``finish_image``: ``imagefolder``) and non-image
datasets train on their eval preprocessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from softlabels.augment import CropFlip, counter_uniform

__all__ = ["CropFlipTrain", "train_transform_for"]


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


def train_transform_for(dataset: Any, input_shape: tuple[int, ...], enabled: bool) -> CropFlipTrain | None:
    """The training view for ``dataset``: crop+flip for image datasets with raw images, unless
    disabled (``--no-aug``); None otherwise."""
    raw = all(callable(getattr(dataset, name, None)) for name in ("raw_image", "image_size", "finish_image"))
    if not enabled or len(tuple(input_shape)) != 3 or not raw:
        return None
    return CropFlipTrain()
