"""Which split to evaluate on, and a held-out part of train when a dataset has none.

Training accuracy is never reported as held-out accuracy: a dataset whose files provide no
held-out split (an image folder without ``test``/``val`` sub-folders) makes the caller choose,
``--eval-split NAME`` or ``--holdout FRACTION`` (a seeded, recorded part of train).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.datasets.spec import split_name, split_path_query
from softlabels.errors import SpecError

__all__ = ["HELD_OUT", "available_splits", "choose_eval_split", "holdout", "Holdout"]

HELD_OUT = ("test", "val")  # the held-out splits recognised by name, in order of preference


def available_splits(spec: str) -> tuple[str, ...]:
    """The splits ``spec`` provides. An image folder without split sub-folders provides none:
    its one pool of images is not a held-out split of itself."""
    from softlabels.datasets import digits, mnist1d, synthetic, vision

    name, rest = split_name(spec)
    modules = {m.NAME: m for m in (mnist1d, digits, synthetic)}
    if name in modules:
        return tuple(modules[name].SPLITS)
    if name in vision.TORCHVISION:
        return tuple(vision.TORCHVISION[name].splits)
    if name == "imagefolder":
        root, _ = split_path_query(name, rest)
        return tuple(d for d in vision.SPLIT_DIRS if os.path.isdir(os.path.join(root, d)))
    return ()


def choose_eval_split(spec: str, train_split: str, eval_split: str | None, holdout_fraction: float | None) -> str | None:
    """The split to evaluate on (None: a ``--holdout`` part of train). Refuses, in one line, an
    evaluation that would measure the training data."""
    if holdout_fraction is not None:
        if eval_split is not None:
            raise SpecError("--holdout and --eval-split exclude each other; pass one of them")
        if not 0.0 < holdout_fraction < 1.0:
            raise SpecError(f"--holdout must be a fraction between 0 and 1 (e.g. 0.1), got {holdout_fraction:g}")
        return None
    splits = available_splits(spec)
    if eval_split is not None:
        eval_split = eval_split.strip().lower()
        if eval_split == train_split:
            raise SpecError(f"--eval-split {eval_split} is the training split; evaluate on a held-out split "
                            f"or pass --holdout 0.1")
        if splits and eval_split not in splits:
            raise SpecError(f"{spec} has no split '{eval_split}' (available: {', '.join(splits)})")
        if not splits:
            raise _no_held_out(spec)
        return eval_split
    for name in HELD_OUT:
        if name in splits and name != train_split:
            return name
    if train_split in HELD_OUT and train_split in splits:
        raise SpecError(
            f"training on the {train_split} split of {spec} leaves no held-out split to evaluate on; pass "
            "--eval-split '' to evaluate nothing, --eval-split NAME, or --holdout 0.1"
        )
    raise _no_held_out(spec)


def _no_held_out(spec: str) -> SpecError:
    return SpecError(
        f"{spec} has no held-out split (no test or val folder), so accuracy on it would be training "
        "accuracy; pass --holdout 0.1 to hold out 10 % of the training split (seeded by --seed), "
        "or add a val/ or test/ folder"
    )


@dataclass(frozen=True)
class Holdout:
    """A seeded split of one dataset into a training part and a held-out part (sample indices
    into the original split, sorted)."""

    train: Any
    held_out: Any
    train_index: np.ndarray
    held_out_index: np.ndarray
    fraction: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "held_out": int(self.held_out_index.size),
                "train": int(self.train_index.size)}


def holdout(dataset: Any, fraction: float, seed: int) -> Holdout:
    """Hold out ``round(fraction * N)`` samples (at least 1, at most N - 1) chosen by a
    permutation seeded with ``seed``; in-memory datasets stay in memory."""
    from softlabels.datasets.info import InMemoryDataset

    n = len(dataset)
    if n < 2:
        raise SpecError(f"--holdout needs at least 2 samples, the training split has {n}")
    count = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    held, kept = np.sort(order[:count]), np.sort(order[count:])

    def part(index: np.ndarray) -> Any:
        if isinstance(dataset, InMemoryDataset):
            t = torch.from_numpy(index)
            return InMemoryDataset(dataset.inputs[t], dataset.targets[t])
        return torch.utils.data.Subset(dataset, index.tolist())

    return Holdout(part(kept), part(held), kept, held, float(fraction), int(seed))
