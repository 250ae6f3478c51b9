"""Distillation losses and the method registry.

Two layers:

* pure functions on tensors (:mod:`~softlabels.losses.functional`: :func:`cross_entropy`,
  :func:`kl_divergence`, ...; :func:`kd_loss` in :mod:`~softlabels.losses.kd_loss`) that know
  nothing about stores;
* *methods* (``ce``, ``ls``, ``kd``, ``kd-topk``, ``kd-pt``, ``kd-sim``, ``kd-pt+sim``,
  ``hint``; one family per module), built by name with :func:`build_method`, that turn a batch
  of stored fields into the teacher target (:class:`softlabels.targets.TeacherTarget`) and call
  the pure functions. A method declares what it needs from the store as data
  (:class:`~softlabels.losses.method.DistillationMethod`); docs/LOSSES.md says how to add one.

Core package: depends on torch, :mod:`softlabels.fields` and :mod:`softlabels.targets` only.
"""

from softlabels.losses import ce, kd, kd_pt, kd_sim, hint  # noqa: F401, I001  (each registers its methods, in this order)
from softlabels.losses.ce import CrossEntropyMethod, LabelSmoothingMethod
from softlabels.losses.functional import (
    LossOutput,
    cross_entropy,
    hint_loss,
    kl_divergence,
    label_smoothing_loss,
    soft_cross_entropy,
)
from softlabels.losses.hint import HintMethod, HintRegressor
from softlabels.losses.kd import PREPARED_DENSE_BYTES, KDMethod, KDTopKMethod, _topk_target
from softlabels.losses.kd_loss import kd_loss
from softlabels.losses.kd_pt import KDGroundTruthMethod
from softlabels.losses.kd_sim import KDGroundTruthSimilarityMethod, KDSimilarityMethod
from softlabels.losses.method import PREPARED_PREFIX, STORE_CONSTANTS, DistillationMethod
from softlabels.losses.registry import build_method, list_methods, method_class, method_defaults, register_method

__all__ = [
    "LossOutput",
    "cross_entropy",
    "soft_cross_entropy",
    "kl_divergence",
    "kd_loss",
    "label_smoothing_loss",
    "hint_loss",
    "HintRegressor",
    "DistillationMethod",
    "STORE_CONSTANTS",
    "PREPARED_PREFIX",
    "register_method",
    "list_methods",
    "method_class",
    "method_defaults",
    "build_method",
    "CrossEntropyMethod",
    "LabelSmoothingMethod",
    "KDMethod",
    "KDTopKMethod",
    "KDGroundTruthMethod",
    "KDSimilarityMethod",
    "KDGroundTruthSimilarityMethod",
    "HintMethod",
    "PREPARED_DENSE_BYTES",
    "_topk_target",
]
