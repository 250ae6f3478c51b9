"""MNIST-1D (Greydanus 2020), generated in-process: no download, nothing cached on disk.

``mnist1d:num_samples=5000,train_split=0.8,seed=42,transfer_samples=20000`` (the defaults)
reproduces the standard 4,000 train / 1,000 test sequences of length 40 that
``mnist1d.data.make_dataset(get_dataset_args())`` returns.

The ``transfer`` split holds ``transfer_samples`` extra sequences from the same generator
(class-balanced), drawn with a seed derived from ``seed`` (``SeedSequence([seed, 1])``), and is
unlabeled. ``make_dataset`` standardises each dataset with its *own* mean/std, which would give
the transfer set a slightly different preprocessing than the data the teacher was trained on;
so generation mirrors ``make_dataset`` (same mnist1d templates and ``transform``, same random
call order, bitwise-identical train/test -- checked by a test against ``make_dataset``) but keeps
the raw sequences, and every split is standardised with the train+test statistics, exactly as
``make_dataset`` standardises train/test.

Generation costs ~0.5 ms per sequence (scipy per-sample interpolation): ~2.5 s for the default
5,000 and ~10 s for 20,000 transfer sequences on one core. Results are memoised in-process.
mnist1d seeds the *global* ``random``/``numpy.random`` state; we save and restore both under a
lock, so loading has no side effect on the caller's RNG streams.
"""

from __future__ import annotations

import functools
import random
import threading

import numpy as np
import torch

from softlabels.datasets.info import DatasetInfo, InMemoryDataset, inputs_sha256
from softlabels.datasets.spec import Param, check_split, format_params, parse_params
from softlabels.errors import SpecError

__all__ = ["NAME", "SPLITS", "SCHEMA", "load", "transfer_seed"]

NAME = "mnist1d"
SPLITS = ("train", "test", "transfer")
NUM_CLASSES = 10
_LOCK = threading.Lock()


def _multiple_of_10(value: int) -> str | None:
    if value < 20 or value % NUM_CLASSES:
        return "must be a multiple of 10 and >= 20 (mnist1d draws the same number of sequences per class)"
    return None


def _fraction(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be strictly between 0 and 1"


def _seed(value: int) -> str | None:
    return None if 0 <= value < 2**32 else "must be in 0..2**32-1 (numpy seed range)"


MAX_SAMPLES = 2_000_000  # generated in memory: 2M x 40 float32 is 320 MB

SCHEMA = {
    "num_samples": Param("int", 5000, _multiple_of_10, maximum=MAX_SAMPLES),
    "train_split": Param("float", 0.8, _fraction),
    "seed": Param("int", 42, _seed),
    "transfer_samples": Param("int", 20000, _multiple_of_10, maximum=MAX_SAMPLES),
}


def transfer_seed(seed: int) -> int:
    """The mnist1d seed of the transfer split: a 32-bit value derived from ``seed``."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _raw(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unstandardised sequences ``[N, 40]`` float64 and labels, in make_dataset's order."""
    from mnist1d.data import get_dataset_args, get_templates
    from mnist1d.transform import transform

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    templates = get_templates()
    with _LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)  # == mnist1d.utils.set_seed
            np.random.seed(seed)
            xs, ys = [], []
            per_class = num_samples // len(templates["y"])
            for label_ix in range(len(templates["y"])):
                for _ in range(per_class):
                    x, _t = transform(templates["x"][label_ix], templates["t"], args)
                    xs.append(x)
                    ys.append(templates["y"][label_ix])
            order = np.random.permutation(len(ys))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    xs_arr = np.stack(xs)[order]
    ys_arr = np.stack(ys)[order].astype(np.int64)
    xs_arr.setflags(write=False)
    ys_arr.setflags(write=False)
    return xs_arr, ys_arr


def load(rest: str, split: str) -> tuple[InMemoryDataset, DatasetInfo]:
    params = parse_params(NAME, rest, SCHEMA)
    check_split(NAME, split, SPLITS)
    spec = f"{NAME}:{format_params(params)}"
    n, seed = params["num_samples"], params["seed"]
    split_ix = int(n * params["train_split"])
    if split_ix <= 0 or split_ix >= n:
        raise SpecError(f"{NAME}: train_split={params['train_split']!r} leaves an empty train or test set")

    base_x, base_y = _raw(n, seed)
    mean, std = float(base_x.mean()), float(base_x.std())
    if split == "train":
        raw, labels = base_x[:split_ix], base_y[:split_ix].copy()
    elif split == "test":
        raw, labels = base_x[split_ix:], base_y[split_ix:].copy()
    else:
        raw, _hidden = _raw(params["transfer_samples"], transfer_seed(seed))
        labels = None

    inputs = torch.from_numpy(((raw - mean) / std).astype(np.float32))
    targets = torch.from_numpy(labels) if labels is not None else torch.full((len(raw),), -1, dtype=torch.int64)
    preprocessing = {
        "name": NAME,
        "generator": "mnist1d.data.make_dataset (mirrored, raw sequences kept)",
        "normalize": {"mean": mean, "std": std, "fit_on": "train+test"},
    }
    if split == "transfer":
        preprocessing["transfer_seed"] = transfer_seed(seed)
    info = DatasetInfo(
        spec=spec,
        split=split,
        num_samples=len(raw),
        num_classes=NUM_CLASSES,
        input_shape=tuple(inputs.shape[1:]),
        labels=labels,
        preprocessing=preprocessing,
        content_sha256=inputs_sha256(inputs),
    )
    return InMemoryDataset(inputs, targets), info
