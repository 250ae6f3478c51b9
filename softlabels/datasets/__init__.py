"""Datasets by spec string: ``load_dataset(spec, split) -> (torch Dataset, DatasetInfo)``.

A spec names the data and every parameter that changes it, so the store can record it and a
student can reload exactly the same inputs later. Grammar::

    spec      := builtin | path_spec
    builtin   := NAME [":" key "=" value ("," key "=" value)*]
                 NAME in mnist1d, digits, synthetic
    path_spec := NAME ":" PATH ["?" key "=" value ("&" key "=" value)*]
                 NAME in cifar10, cifar100, mnist, fashionmnist, kmnist, svhn, imagefolder

Examples: ``mnist1d``, ``mnist1d:num_samples=5000,seed=0``,
``synthetic:tau=0.5,difficulty=2,seed=0``, ``digits:seed=1``, ``cifar10:/data/cifar``,
``imagefolder:/data/imagenet?size=256&crop=224``. Names and keys are case-insensitive; missing
parameters take their defaults. ``DatasetInfo.spec`` is the canonical form: all parameters
spelled out in a fixed order (and paths made absolute), so equal specs mean equal data.

Splits: built-ins have ``train`` and ``test`` (labelled) and -- except digits -- ``transfer``:
unlabeled extra inputs from the same generator with another seed, for teachers that label
extra data once. Path datasets have the splits their files provide; see
:mod:`softlabels.datasets.vision`.

Item ``i`` of every dataset is ``(x: FloatTensor[*input_shape], y: int)`` with ``y = -1`` when
unlabeled; items are index-deterministic and datasets pickle (Ray and DataLoader workers).
Built-ins are :class:`InMemoryDataset` with ``.inputs``/``.targets`` tensors for fast batching.
Parameters and defaults of each built-in: :mod:`.mnist1d`, :mod:`.digits`, :mod:`.synthetic`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from softlabels.datasets import digits, mnist1d, synthetic, vision
from softlabels.datasets.info import DatasetInfo, InMemoryDataset, inputs_sha256
from softlabels.datasets.spec import split_name
from softlabels.registry import Registry

__all__ = ["DatasetInfo", "InMemoryDataset", "load_dataset", "list_datasets", "inputs_sha256"]

Loader = Callable[[str, str], tuple[torch.utils.data.Dataset, DatasetInfo]]
# name -> load(rest_of_spec, split). Adding a dataset: one module with NAME and load(), one line here.
_DATASETS: Registry[Loader] = Registry("dataset")
for _module in (mnist1d, digits, synthetic):
    _DATASETS.register(_module.NAME)(_module.load)
for _name in vision.TORCHVISION:
    _DATASETS.register(_name)(partial(vision.load_torchvision, _name))
_DATASETS.register("imagefolder")(vision.load_imagefolder)


def list_datasets() -> list[str]:
    """Known dataset names: built-ins first, then the ones read from a local path."""
    return list(_DATASETS)


def load_dataset(spec: str, split: str = "train") -> tuple[torch.utils.data.Dataset, DatasetInfo]:
    """Load one split of the dataset ``spec`` (grammar in this module's docstring).

    Raises :class:`~softlabels.errors.SpecError` for unknown names, bad parameters, unknown
    splits and missing local data.
    """
    name, rest = split_name(spec)
    split = split.strip().lower()
    hint = " (local files: use imagefolder:/path)" if name.startswith(("/", ".", "~")) else ""
    load = _DATASETS.get(name, hint=f"unknown dataset '{name or spec}'{hint}; known: {', '.join(list_datasets())}")
    return load(rest, split)
