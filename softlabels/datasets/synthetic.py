"""Synthetic super-class task of Tang et al. (2020), "Understanding and Improving Knowledge
Distillation": class similarity is a dial (``tau``), so one can test whether a distillation
method transfers the teacher's knowledge of which classes are alike.

Generator (all parameters with their defaults)::

    synthetic:tau=0.5,difficulty=2,seed=0,num_classes=20,superclasses=4,dim=32,
              train_samples=20000,test_samples=5000,transfer_samples=20000

* ``S = superclasses`` orthonormal vectors ``u_s`` in R^dim (QR of a Gaussian matrix).
* Class ``c`` belongs to super-class ``s = c // (C / S)`` and has the unit vector
  ``w_c = tau * u_s + sqrt(1 - tau^2) * v_c`` with ``v_c`` a random unit vector orthogonal to
  ``u_s``; so ``cos(w_c, u_s) = tau`` and two classes of one super-class have cosine ~tau^2
  (``tau=1``: identical).
* ``x ~ N(0, I_dim)``, ``y = argmax_c f(w_c . x)``, ``f(z) = z + sum_{m=1..M} sin(a_m z + b_m)``
  with ``M = difficulty``, ``a_m = 1 + m/10``, ``b_m = 0``. Since one ``f`` is applied to every
  class, a monotone ``f`` would leave the linear argmax unchanged; these ``a_m > 1`` make ``f``
  non-monotone, so ``difficulty`` is a dial: the share of labels equal to the linear argmax is
  1.00 / 0.97 / 0.68 / 0.51 / 0.40 for M = 0..4 (defaults otherwise). Labels are computed from
  the stored float32 inputs.

Defaults are sized so that a teacher clearly beats a small student on CPU: with them (20
epochs, Adam 3e-3) ``resmlp`` reaches ~78% test accuracy, ``mlp`` ~59%, ``linear`` ~61%
(chance 5%). Generation is vectorised numpy: 20,000 samples take well under a second.

The class geometry depends only on ``seed`` (plus ``num_classes``, ``superclasses``, ``dim``;
``u_s`` and ``v_c`` do not depend on ``tau``, so a tau sweep moves the same vectors); the split
only selects the stream of ``x`` (``SeedSequence([seed, 1|2|3])`` for train/test/transfer).
``transfer`` is unlabeled.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from softlabels.datasets.info import DatasetInfo, InMemoryDataset, inputs_sha256
from softlabels.datasets.spec import Param, check_split, format_params, non_negative, parse_params, positive
from softlabels.errors import SpecError

__all__ = ["NAME", "SPLITS", "SCHEMA", "load", "class_geometry", "label_inputs", "sine_constants"]

NAME = "synthetic"
SPLITS = ("train", "test", "transfer")
_SPLIT_STREAM = {"train": 1, "test": 2, "transfer": 3}

SCHEMA = {
    "tau": Param("float", 0.5, lambda v: None if 0.0 <= v <= 1.0 else "must be in [0, 1]"),
    "difficulty": Param("int", 2, non_negative, maximum=1000),
    "seed": Param("int", 0, non_negative),
    "num_classes": Param("int", 20, lambda v: None if v >= 2 else "must be >= 2", maximum=100_000),
    "superclasses": Param("int", 4, positive, maximum=100_000),
    "dim": Param("int", 32, lambda v: None if v >= 2 else "must be >= 2", maximum=4096),
    "train_samples": Param("int", 20000, positive, maximum=5_000_000),
    "test_samples": Param("int", 5000, positive, maximum=5_000_000),
    "transfer_samples": Param("int", 20000, positive, maximum=5_000_000),
}


def sine_constants(difficulty: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of the ``difficulty`` sine terms: ``a_m = 1 + m/10``, ``b_m = 0``, m = 1..M."""
    m = np.arange(1, difficulty + 1, dtype=np.float64)
    return 1.0 + m / 10.0, np.zeros_like(m)


def class_geometry(seed: int, num_classes: int, superclasses: int, dim: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Super-class basis ``U [S, dim]`` (orthonormal rows) and class vectors ``W [C, dim]``
    (unit rows; rows ``s*C/S .. (s+1)*C/S - 1`` belong to super-class ``s``), float64."""
    _check_geometry(num_classes, superclasses, dim)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    q, r = np.linalg.qr(rng.standard_normal((dim, superclasses)))
    basis = (q * np.where(np.diag(r) < 0, -1.0, 1.0)).T  # sign-fixed: unique given the draw
    per = num_classes // superclasses
    rows = []
    for u in basis:
        v = rng.standard_normal((per, dim))
        v -= np.outer(v @ u, u)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        rows.append(tau * u + math.sqrt(max(0.0, 1.0 - tau * tau)) * v)
    return basis, np.concatenate(rows)


def label_inputs(x: np.ndarray, weights: np.ndarray, difficulty: int) -> np.ndarray:
    """``argmax_c f(w_hat_c . x)`` for inputs ``[N, dim]``; int64 ``[N]``."""
    w_hat = weights / np.linalg.norm(weights, axis=1, keepdims=True)
    z = x.astype(np.float64) @ w_hat.T
    score = z.copy()
    for a, b in zip(*sine_constants(difficulty)):
        score += np.sin(a * z + b)
    return score.argmax(axis=1).astype(np.int64)


def _check_geometry(num_classes: int, superclasses: int, dim: int) -> None:
    if num_classes % superclasses:
        raise SpecError(f"{NAME}: num_classes={num_classes} must be a multiple of superclasses={superclasses}")
    if superclasses > dim:
        raise SpecError(f"{NAME}: superclasses={superclasses} cannot exceed dim={dim} (the u_s are orthonormal)")


def load(rest: str, split: str) -> tuple[InMemoryDataset, DatasetInfo]:
    p = parse_params(NAME, rest, SCHEMA)
    check_split(NAME, split, SPLITS)
    _, weights = class_geometry(p["seed"], p["num_classes"], p["superclasses"], p["dim"], p["tau"])
    n = p[f"{split}_samples"]
    rng = np.random.default_rng(np.random.SeedSequence([p["seed"], _SPLIT_STREAM[split]]))
    x = rng.standard_normal((n, p["dim"])).astype(np.float32)
    labels = label_inputs(x, weights, p["difficulty"]) if split != "transfer" else None
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(labels) if labels is not None else torch.full((n,), -1, dtype=torch.int64)
    a, b = sine_constants(p["difficulty"])
    info = DatasetInfo(
        spec=f"{NAME}:{format_params(p)}",
        split=split,
        num_samples=n,
        num_classes=p["num_classes"],
        input_shape=(p["dim"],),
        labels=None if labels is None else labels.copy(),
        preprocessing={"name": NAME, "normalize": None, "sine_a": a.tolist(), "sine_b": b.tolist()},
        content_sha256=inputs_sha256(inputs),
    )
    return InMemoryDataset(inputs, targets), info
