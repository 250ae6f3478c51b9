"""The KD family's base, and ``kd`` / ``kd-topk``: KD from the stored top-k."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from softlabels.errors import InvalidTargetsError
from softlabels.fields import LOGSUMEXP, TOPK_FIELDS, TOPK_VALUES
from softlabels.losses.functional import LossOutput, _check_probs, _nonnegative_if_cheap
from softlabels.losses.kd_loss import kd_output
from softlabels.losses.method import PREPARED_PREFIX, DistillationMethod, _non_negative, _positive
from softlabels.losses.registry import register_method
from softlabels.targets import TeacherTarget, stored_topk_fields

#: Prepared targets are scattered to dense ``[N, C]`` float32 rows (no gather/scatter per step)
#: when the two dense arrays (probabilities and their logs) fit in this many bytes.
PREPARED_DENSE_BYTES = 1 << 28
_PREPARE_CHUNK_ELEMENTS = 1 << 22  # rows are prepared this many [row, class] elements at a time


class _KDMethod(DistillationMethod):
    """KD against a (possibly synthetic) teacher distribution. A subclass implements one
    :meth:`target` -- the distribution at T as a :class:`~softlabels.targets.TeacherTarget`, a
    per-row function of the stored row (and its label) -- and gets the loss (:func:`kd_loss`'s),
    the dense reference :meth:`teacher_distribution` (``target(...).dense(C)``) and loss-ready
    rows (:meth:`prepare_rows`) from it.

    A subclass may instead override :meth:`teacher_distribution` (a dense ``[B, C]`` target,
    possibly learnable): then that is the target, and there are no loss-ready rows.
    """

    reads_store = True

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self.temperature = _positive("temperature", temperature)
        self.ce_weight = _non_negative("ce_weight", ce_weight)
        self.kd_weight = _non_negative("kd_weight", kd_weight)
        self.hparams = {"temperature": self.temperature, "ce_weight": self.ce_weight, "kd_weight": self.kd_weight}

    def target(self, labels: torch.Tensor | None, targets: Mapping[str, torch.Tensor], num_classes: int) -> TeacherTarget:
        """The teacher distribution at ``self.temperature`` for a batch of stored ``targets``."""
        raise NotImplementedError

    def teacher_distribution(
        self, labels: torch.Tensor | None, targets: Mapping[str, torch.Tensor], num_classes: int
    ) -> torch.Tensor:
        """Teacher distribution at ``self.temperature``, ``[B, C]`` float32, rows sum to 1."""
        return self.target(labels, targets, num_classes).dense(num_classes)

    @property
    def _use_fast_target(self) -> bool:
        """Whether :meth:`target` is the target (False when a subclass overrides the dense
        :meth:`teacher_distribution`)."""
        return type(self).teacher_distribution is _KDMethod.teacher_distribution

    @property
    def prepared_prefix(self) -> str | None:  # type: ignore[override]
        """``"prepared/<name>,<target hyperparameters>,num_classes=C/"``: prepared rows are
        only ever read by a method that would build the same target."""
        if not self._use_fast_target:
            return None
        # cached in the instance dict: the loss reads it every step (nn.Module attribute lookups are slow)
        prefix = self.__dict__.get("_prepared_prefix")
        if prefix is None:
            keys = {k: v for k, v in self.hparams.items() if k not in ("ce_weight", "kd_weight")}
            keys["num_classes"] = self.num_classes
            prefix = PREPARED_PREFIX + ",".join([self.name, *(f"{k}={v}" for k, v in keys.items())]) + "/"
            self.__dict__["_prepared_prefix"] = prefix
        return prefix

    def prepare_rows(self, fields, labels):
        num_classes, prefix = self.num_classes, self.prepared_prefix
        rows = labels.shape[0] if labels is not None else next((t.shape[0] for t in fields.values()), 0)
        if prefix is None or num_classes is None or rows == 0:
            return None
        if self.requires_labels:
            if labels is None:
                return None
            labels = labels.long().clamp(0, num_classes - 1)  # rows with no valid label fail the call's check
        dense = 2 * 4 * rows * num_classes <= PREPARED_DENSE_BYTES
        step = max(1, _PREPARE_CHUNK_ELEMENTS // num_classes)
        out: dict[str, torch.Tensor] = {}
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunk = {name: t[start:stop] for name, t in fields.items()}
            target = self.target(None if labels is None else labels[start:stop], chunk, num_classes)
            if target.index is None and not dense:
                return None  # a dense-by-nature target over the budget: built per batch instead
            part = target.loss_ready(num_classes, dense).fields(prefix)
            if not out:
                out = {k: v.new_empty((rows, *v.shape[1:])) for k, v in part.items()}
            for k, v in part.items():
                out[k][start:stop] = v
        return out

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        return self.loss(student_logits, labels, targets, self._labels_nonnegative)

    def loss(self, student_logits, labels, targets, all_labelled: bool | None = None) -> LossOutput:
        """The KD loss of a batch (``all_labelled``: every label is known to be >= 0)."""
        num_classes = student_logits.shape[-1]
        prefix = self.prepared_prefix
        if prefix is not None and prefix + "probs" in targets:
            target = TeacherTarget.from_fields(targets, prefix)
            width = (target.probs if target.index is None else target.index).shape[-1]
            if width > num_classes or (target.index is None and width != num_classes):
                raise InvalidTargetsError(
                    f"prepared targets have {width} classes per row, the student {num_classes}"
                )
        elif self._use_fast_target:
            target = self.target(labels, targets, num_classes)
        else:  # a subclass's own dense target (a learnable one gets gradients)
            probs = self.teacher_distribution(labels, targets, num_classes)
            _check_probs(student_logits, probs)
            target = TeacherTarget(probs=probs)
        if all_labelled is None and labels is not None:
            all_labelled = _nonnegative_if_cheap(labels)
        return kd_output(student_logits, labels, target, self.temperature, self.ce_weight, self.kd_weight, all_labelled)


@register_method("kd")
class KDMethod(_KDMethod):
    """Hinton KD from everything the store holds. With k == C the target is the exact teacher
    softmax at T. With k < C the full softmax is not recoverable: the target is the exact
    top-k plus the exact tail mass spread uniformly, i.e. *identical to* ``kd-topk`` with the
    stored k (a one-time warning says so) -- we do not raise, because that is the best
    approximation the store allows and the store's k is recorded with the run."""

    needs = TOPK_FIELDS

    def __init__(self, *, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=None) -> None:
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)
        self._warned = False

    def target(self, labels, targets, num_classes):
        self._warn_partial(targets, num_classes)
        return _topk_target(targets, self.temperature, num_classes)

    def _warn_partial(self, targets, num_classes):
        k = targets[TOPK_VALUES].shape[-1]
        if k < num_classes and not self._warned:
            self._warned = True
            warnings.warn(
                f"store has top-{k} of {num_classes} classes: 'kd' uses the exact top-{k} probabilities plus a "
                f"uniform tail (same as 'kd-topk' with k={k}); dump with --k {num_classes} for exact KD",
                stacklevel=2,  # once per method: where it is first met (a dataset or a loss call) varies
            )


@register_method("kd-topk")
class KDTopKMethod(_KDMethod):
    """KD-topk (Tang et al. 2020): exact top-k teacher probabilities at T, remaining mass
    uniform over the other C - k classes. ``k`` uses the first k of the stored top-k
    (k <= stored k); ``k=None`` uses all stored (then equal to ``kd``)."""

    needs = TOPK_FIELDS

    def __init__(self, *, k: int | None = None, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=None):
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)
        if k is not None and int(k) < 1:
            raise SpecError(f"k must be >= 1, got {k}")
        if k is not None and self.num_classes is not None and int(k) > self.num_classes:
            raise SpecError(f"k={k} exceeds num_classes={self.num_classes}")
        self.k = None if k is None else int(k)
        self.hparams = {"k": self.k, **self.hparams}

    def target(self, labels, targets, num_classes):
        return _topk_target(targets, self.temperature, num_classes, self.k)


def _topk_target(targets: Mapping[str, torch.Tensor], temperature: float, num_classes: int, k: int | None = None):
    """:meth:`TeacherTarget.topk` of a batch's stored fields (first ``k`` of the stored top-k)."""
    values, indices = stored_topk_fields(targets, num_classes, k)
    return TeacherTarget.topk(values, indices, targets[LOGSUMEXP], temperature, num_classes)
