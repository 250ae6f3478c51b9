"""Augmentation views with explicit, replayable parameters.

A *policy* does two things, and the dump and the trainer call the very same code for both:

* :meth:`Policy.sample` draws explicit parameters for every (sample ``i``, view ``v``) from a
  counter-based RNG keyed by ``(seed, i, v)`` alone, so the parameters do not depend on worker
  count, unit order, batch size or resume (and, being stored, not on library versions either);
* :meth:`Policy.build` applies given parameters to raw samples with
  ``torchvision.transforms.v2.functional`` / plain tensor indexing, then the dataset's eval
  preprocessing. The dump feeds the result to the teacher; the trainer rebuilds the same view
  from the stored parameters -- bit-identical, with no RNG replay.

Dump policies (``softlabels dump --augment``):

``none``                      no augmentation (V must be 1).
``shift1d:max=6``             1-D signals (mnist1d): circular shift by ``s`` in ``[-max, max]``
                              (``torch.roll``; a roll commutes exactly with mnist1d's scalar
                              standardisation, and mnist1d's own ``translate`` is circular too).
``crop-flip:min_scale=0.08,max_scale=1,min_ratio=0.75,max_ratio=1.3333333333333333,flip=0.5``
                              images (imagefolder): view 0 is the dataset's evaluation view
                              (Resize + CenterCrop, no flip; stored as box 0,0,0,0); views 1..V-1 a
                              RandomResizedCrop box in source pixels, resized to the dataset's crop
                              size, then an optional horizontal flip.

Student-only extras (``softlabels train --student-augment``), drawn fresh per (seed, epoch,
sample) and applied after the replayed view; the teacher never saw them: ``shift1d:max=N``,
``noise:std=S`` (gaussian noise on the model input), ``flip`` (horizontal flip of images).
See docs/FORMAT.md section "Augmentation" for the exact semantics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.datasets.spec import Param, format_params, parse_params, split_name
from softlabels.datasets.info import in_memory
from softlabels.errors import SpecError
from softlabels.registry import Registry
from softlabels.splitmix import splitmix64

__all__ = [
    "AUGMENT_VERSION",
    "POLICIES",
    "STUDENT_AUGMENTS",
    "Policy",
    "get_policy",
    "policy_from_metadata",
    "StudentAugment",
    "get_student_augment",
    "eval_inputs",
    "counter_uniform",
]

AUGMENT_VERSION = 1  # a policy's default version; crop-flip is at 2 (view 0 = the evaluation view)


def counter_uniform(key: tuple[int, ...], index: np.ndarray, views: int) -> np.ndarray:
    """``uint64 [n, views]`` random words that depend only on (key, sample index, view):
    splitmix64 chained over the key words, the index and the view number."""
    h = np.zeros((), dtype=np.uint64)
    for word in key:
        h = splitmix64(h ^ np.uint64(int(word) & 0xFFFFFFFFFFFFFFFF))
    rows = splitmix64(h ^ np.asarray(index, dtype=np.uint64))
    return splitmix64(rows[:, None] ^ (np.arange(views, dtype=np.uint64)[None, :] + np.uint64(1)))


def eval_inputs(dataset: Any, index: np.ndarray) -> torch.Tensor:
    """The dataset's eval-preprocessed inputs for ``index`` as one tensor."""
    tensors = in_memory(dataset)
    if tensors is not None:
        return tensors[0][torch.from_numpy(np.asarray(index, dtype=np.int64))]
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in index])


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row ``r`` of ``x [n, L]`` rolled right by ``shift[r]`` along the last axis: exactly
    ``torch.roll(x[r], int(shift[r]), -1)`` for every row, as one gather."""
    length = x.shape[-1]
    source = (torch.arange(length).unsqueeze(0) - shift.to(torch.int64).unsqueeze(1)) % length
    return torch.gather(x, -1, source)


@dataclass(frozen=True)
class ParamArray:
    """One stored parameter: ``augment/<name>``, shape ``[N, V, *tail]``, dtype."""

    name: str
    tail: tuple[int, ...]
    dtype: str


class _Named:
    """A registry entry with validated parameters; ``spec`` is how a user writes it back."""

    name = ""
    schema: dict[str, Param] = {}

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    @property
    def spec(self) -> str:
        text = format_params(self.params)
        return f"{self.name}:{text}" if text else self.name


class Policy(_Named):
    """Base class: a named policy with validated parameters (see the module docstring)."""

    arrays: tuple[ParamArray, ...] = ()
    version = AUGMENT_VERSION  # bumped when what the stored parameters mean changes

    def metadata(self, seed: int) -> dict[str, Any]:
        """What a store records in ``schema.augmentation``."""
        return {
            "policy": self.name,
            "params": dict(self.params),
            "seed": int(seed),
            "version": self.version,
            "arrays": {a.name: {"shape": list(a.tail), "dtype": a.dtype} for a in self.arrays},
        }

    def check_dataset(self, dataset: Any, info: Any) -> None:
        """Raise SpecError when the policy cannot apply to this dataset."""

    def sample(self, seed: int, index: np.ndarray, views: int, dataset: Any) -> dict[str, np.ndarray]:
        """Explicit parameters ``{name: [n, views, *tail]}`` for the samples ``index``."""
        return {}

    def build(self, dataset: Any, index: np.ndarray, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The model inputs ``[n, ...]`` for samples ``index``, one view each (``params[name]``
        is ``[n, *tail]``)."""
        return eval_inputs(dataset, index)


class NoAugment(Policy):
    name = "none"


def _nonneg_int(value: int) -> str | None:
    return None if 0 <= value <= 32767 else "must be in 0..32767"


class Shift1D(Policy):
    """Circular shift of 1-D signals by ``s`` samples, ``s`` uniform in ``[-max, max]``."""

    name = "shift1d"
    schema = {"max": Param("int", 6, _nonneg_int)}
    arrays = (ParamArray("shift", (), "int16"),)

    def check_dataset(self, dataset: Any, info: Any) -> None:
        if len(tuple(info.input_shape)) != 1:
            raise SpecError(
                f"augmentation {self.name} shifts 1-D signals but {info.spec} has inputs of shape "
                f"{tuple(info.input_shape)}; use crop-flip for images"
            )
        if self.params["max"] >= info.input_shape[0]:
            raise SpecError(f"{self.name}: max={self.params['max']} must be below the signal length {info.input_shape[0]}")

    def sample(self, seed: int, index: np.ndarray, views: int, dataset: Any) -> dict[str, np.ndarray]:
        width = np.uint64(2 * self.params["max"] + 1)
        words = counter_uniform((seed, 0x5E1F7), index, views)
        return {"shift": ((words % width).astype(np.int64) - self.params["max"]).astype(np.int16)}

    def build(self, dataset: Any, index: np.ndarray, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        return roll_rows(eval_inputs(dataset, index), torch.from_numpy(np.asarray(params["shift"])))


def _unit_fraction(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


class CropFlip(Policy):
    """RandomResizedCrop box (torchvision's algorithm, our RNG) + horizontal flip, for images
    whose dataset exposes raw decoded images (``imagefolder``). View 0 is the clean evaluation
    view (stored as box ``(0, 0, 0, 0)``, no flip), so ``--views first`` and the ``view0``
    figures are the teacher on clean inputs; views 1..V-1 are random."""

    name = "crop-flip"
    schema = {
        "min_scale": Param("float", 0.08, lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "max_scale": Param("float", 1.0, lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "min_ratio": Param("float", 0.75, lambda v: None if v > 0 else "must be > 0"),
        "max_ratio": Param("float", 4.0 / 3.0, lambda v: None if v > 0 else "must be > 0"),
        "flip": Param("float", 0.5, _unit_fraction),
    }
    arrays = (ParamArray("box", (4,), "int32"), ParamArray("flip", (), "uint8"))
    version = 2  # 1: view 0 was a random crop too; 2: view 0 is the evaluation view (box 0,0,0,0)

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        if self.params["min_scale"] > self.params["max_scale"] or self.params["min_ratio"] > self.params["max_ratio"]:
            raise SpecError(f"{self.name}: min_scale/min_ratio must not exceed max_scale/max_ratio")

    def check_dataset(self, dataset: Any, info: Any) -> None:
        if not callable(getattr(dataset, "raw_image", None)) or len(tuple(info.input_shape)) != 3:
            raise SpecError(
                f"augmentation {self.name} needs images read from files (imagefolder:/path); {info.spec} "
                f"has inputs of shape {tuple(info.input_shape)} and no raw images -- use shift1d for 1-D signals"
            )

    def _box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params, drawn from ``rng``: 10 tries, then a
        centre crop clamped to the ratio range."""
        p = self.params
        area = height * width
        log_lo, log_hi = math.log(p["min_ratio"]), math.log(p["max_ratio"])
        for _ in range(10):
            target = area * rng.uniform(p["min_scale"], p["max_scale"])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < p["min_ratio"]:
            w, h = width, int(round(width / p["min_ratio"]))
        elif in_ratio > p["max_ratio"]:
            h, w = height, int(round(height * p["max_ratio"]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def sample(self, seed: int, index: np.ndarray, views: int, dataset: Any) -> dict[str, np.ndarray]:
        index = np.asarray(index, dtype=np.int64)
        words = counter_uniform((seed, 0xC309), index, views)
        box = np.zeros((index.size, views, 4), dtype=np.int32)
        flip = np.zeros((index.size, views), dtype=np.uint8)
        for r, i in enumerate(index):
            height, width = dataset.image_size(int(i))
            for v in range(1, views):  # view 0 stays box (0, 0, 0, 0), flip 0: the evaluation view
                rng = np.random.Generator(np.random.Philox(key=int(words[r, v])))
                box[r, v] = self._box(rng, height, width)
                flip[r, v] = rng.random() < self.params["flip"]
        return {"box": box, "flip": flip}

    def build(self, dataset: Any, index: np.ndarray, params: Mapping[str, np.ndarray]) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        size = list(dataset.crop_size)
        out, decoded = [], {}  # several views of one sample decode its file once
        for r, i in enumerate(np.asarray(index, dtype=np.int64)):
            top, left, h, w = (int(t) for t in params["box"][r])
            if int(i) not in decoded:
                decoded[int(i)] = dataset.raw_image(int(i))
            if h == 0:  # the evaluation view: the dataset's own Resize + CenterCrop, never flipped
                out.append(dataset.eval_image(decoded[int(i)]))
                continue
            img = F.resized_crop(
                decoded[int(i)], top, left, h, w, size,
                interpolation=InterpolationMode.BILINEAR, antialias=True,
            )
            if params["flip"][r]:
                img = F.horizontal_flip(img)
            out.append(dataset.finish_image(img))
        return torch.stack(out)


POLICIES: Registry[type[Policy]] = Registry("augmentation policy")
for _policy in (NoAugment, Shift1D, CropFlip):
    POLICIES.register(_policy.name)(_policy)


def _parse(spec: str, registry: Registry, role: str) -> tuple[type, dict[str, Any]]:
    name, rest = split_name(spec or "none")
    cls = registry.get(name, hint=f"unknown {role} {name!r} (known: {', '.join(registry)}); e.g. shift1d:max=6")
    return cls, parse_params(name, rest, cls.schema)


def get_policy(spec: str | None) -> Policy:
    """``"shift1d:max=4"`` -> a Shift1D policy (``None``/``"none"`` -> no augmentation)."""
    cls, params = _parse(spec or "none", POLICIES, "augmentation policy")
    return cls(params)


def policy_from_metadata(meta: Mapping[str, Any] | None) -> Policy | None:
    """The policy a store recorded (None for stores without augmentation)."""
    if not meta or meta.get("policy", "none") == "none":
        return None
    version = int(meta.get("version", 1))
    if meta["policy"] not in POLICIES or version > POLICIES.get(meta["policy"]).version:
        raise SpecError(
            f"the store uses augmentation {meta['policy']!r} version {version}, which this softlabels cannot "
            "replay; upgrade softlabels"
        )
    cls = POLICIES.get(meta["policy"])
    params = {key: cls.schema[key].default for key in cls.schema}
    params.update(meta.get("params", {}))
    return cls(params)


# --------------------------------------------------------------------------------------
# Student-only extras: fresh per (seed, epoch, sample); the teacher never saw them
# --------------------------------------------------------------------------------------
class StudentAugment(_Named):
    """Applied to the model input after any replayed view. NOT seen by the teacher."""

    def check_shape(self, input_shape: tuple[int, ...]) -> None:
        pass

    def __call__(self, x: torch.Tensor, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        raise NotImplementedError


class StudentShift1D(StudentAugment):
    name = "shift1d"
    schema = Shift1D.schema

    def check_shape(self, input_shape: tuple[int, ...]) -> None:
        if len(input_shape) != 1:
            raise SpecError(f"--student-augment shift1d needs 1-D inputs, got shape {input_shape}; use flip or noise")

    def __call__(self, x: torch.Tensor, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        width = np.uint64(2 * self.params["max"] + 1)
        words = counter_uniform((seed, epoch, 0x57D), index, 1)[:, 0]
        shift = (words % width).astype(np.int64) - self.params["max"]
        return roll_rows(x, torch.from_numpy(shift))


class StudentNoise(StudentAugment):
    name = "noise"
    schema = {"std": Param("float", 0.05, lambda v: None if v >= 0 else "must be >= 0")}

    def __call__(self, x: torch.Tensor, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        words = counter_uniform((seed, epoch, 0x9015E), index, 1)[:, 0]
        noise = np.stack(
            [np.random.Generator(np.random.Philox(key=int(w))).standard_normal(x.shape[1:]) for w in words]
        ) if len(words) else np.zeros(x.shape)
        return x + torch.from_numpy(noise.astype(np.float32)).reshape(x.shape) * self.params["std"]


class StudentFlip(StudentAugment):
    name = "flip"
    schema = {"p": Param("float", 0.5, _unit_fraction)}

    def check_shape(self, input_shape: tuple[int, ...]) -> None:
        if len(input_shape) != 3:
            raise SpecError(f"--student-augment flip needs images [C, H, W], got shape {input_shape}; use shift1d")

    def __call__(self, x: torch.Tensor, index: np.ndarray, seed: int, epoch: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        words = counter_uniform((seed, epoch, 0xF11), index, 1)[:, 0]
        flip = torch.from_numpy((words >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.params["p"])
        return torch.where(flip.view(-1, *[1] * (x.ndim - 1)), F.horizontal_flip(x), x)


STUDENT_AUGMENTS: Registry[type[StudentAugment]] = Registry("student augmentation")
for _augment in (StudentShift1D, StudentNoise, StudentFlip):
    STUDENT_AUGMENTS.register(_augment.name)(_augment)


def get_student_augment(spec: str | None) -> StudentAugment | None:
    """``"noise:std=0.05"`` -> a student-only augmentation (None for ``None``/``"none"``)."""
    if not spec or spec.strip().lower() == "none":
        return None
    cls, params = _parse(spec, STUDENT_AUGMENTS, "student augmentation")
    return cls(params)
