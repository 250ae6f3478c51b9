"""The base class of a distillation method: what it declares it needs, and its checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fields import LOGSUMEXP
from softlabels.losses.functional import LossOutput, _check_logits

#: Keys of loss-ready targets (:meth:`DistillationMethod.prepare_rows`) start with this.
PREPARED_PREFIX = "prepared/"


#: Store-level constants a trainer may pass to *every* :func:`build_method` call; a method
#: that does not use one ignores it (every other unknown keyword is an error).
STORE_CONSTANTS = frozenset({"num_classes", "classifier_weight", "teacher_feature_shape", "teacher_feature_stats"})


class DistillationMethod(nn.Module):
    """Base class of a registered method: a loss from a batch of stored fields.

    What a method needs from the store is declared as data, which the trainer reads and never
    second-guesses. On the class (read before building): ``name``; ``reads_store`` (it needs a
    store at all); ``store_constants`` (the build-time constants of :data:`STORE_CONSTANTS`
    it takes from the store beyond ``num_classes``); ``requires_labels``; :meth:`feature_layer`
    (the stored feature it reads, given its hyperparameters). On the instance: ``needs``
    (frozenset of per-sample store arrays the ``targets`` dict must hold); ``temperature``
    (select that ``logsumexp`` column when ``"logsumexp" in needs``; None if unused);
    ``uses_features`` (pass ``student_features``); ``stages``; ``hparams`` (resolved
    hyperparameters); :meth:`run_metrics` (extra entries for ``metrics.json``). It is an ``nn.Module`` so that any
    trainable part (the hint regressor) follows ``.to(device)``, ``parameters()`` (add them
    to the optimizer) and ``state_dict()``.

    Call: ``method(student_logits [B, C], labels [B] | None, targets, *, student_features=None,
    stage=None) -> LossOutput`` where ``targets`` maps store array names to batch tensors:
    ``topk_values [B, k]`` (T=1 logits, sorted descending), ``topk_indices [B, k]``,
    ``logsumexp [B]`` (the column of ``self.temperature``), ``label_logit [B]``,
    ``features/<name> [B, D]``; or the rows of :meth:`prepare_rows`'s loss-ready fields.
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    reads_store: ClassVar[bool] = False
    store_constants: ClassVar[frozenset[str]] = frozenset()
    needs: frozenset[str] = frozenset()
    temperature: float | None = None
    uses_features: bool = False
    stages: tuple[str, ...] = ("main",)
    #: Label validation (range ``< C``; ``>= 0`` for ``requires_labels`` methods). ``"auto"``:
    #: every batch whose labels are on the CPU (a host-side min/max, no device sync), and only
    #: the first batch whose labels are on an accelerator (reading min/max back is a device
    #: sync per step); ``"always"``: every batch, wherever the labels live. Set per instance.
    check_labels: str = "auto"
    _labels_checked: bool = False  # an accelerator batch passed the check
    _labels_nonnegative: bool | None = None  # per call: every label >= 0 (None: not known)
    #: Keys of this method's loss-ready fields start with this (None: it has none).
    prepared_prefix: str | None = None

    def __init__(self, *, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and int(num_classes) < 2:
            raise SpecError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.hparams: dict[str, Any] = {}

    # -- protocol ---------------------------------------------------------------------
    @classmethod
    def feature_layer(cls, hparams: Mapping[str, Any]) -> str | None:
        """The stored teacher feature (``features/<name>``) this method reads with ``hparams``;
        None when it reads none."""
        return None

    def run_metrics(self, stages_run: list[str]) -> dict[str, Any]:
        """Method-specific entries for the run's ``metrics.json`` (``stages_run``: the stages
        the epochs used, in order)."""
        return {}

    def stage(self, epoch: int, total_epochs: int) -> str:
        """Which loss applies in 0-based ``epoch`` of ``total_epochs``; pass it back as ``stage=``."""
        return self.stages[0]

    def prepare_rows(
        self, fields: Mapping[str, torch.Tensor], labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """Loss-ready targets for whole rows, so that a step does not rebuild them.

        ``fields``: the store arrays of :attr:`needs` for ``N`` rows, as a batch holds them;
        ``labels [N]`` (-1 = unlabelled; methods whose target depends on the label read it).
        Returns ``{key: tensor [N, ...]}`` (keys start with :attr:`prepared_prefix`) such that
        any selection of rows is a valid ``targets`` for this method's call and gives the same
        loss as the raw fields of those rows; or None when the method has no such form (its
        target is not a fixed per-row function of the stored row, or too large), and batches
        then carry the raw fields. :class:`softlabels.data.DistillDataset` calls it once
        for preloaded arrays, otherwise once per batch.
        """
        return None

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor | None,
        targets: Mapping[str, torch.Tensor],
        *,
        student_features: torch.Tensor | None = None,
        stage: str | None = None,
    ) -> LossOutput:
        # plain attribute write: nn.Module.__setattr__ costs ~10 us per call
        self.__dict__["_labels_nonnegative"] = self._check_call(student_logits, labels, targets, stage)
        return self.compute(student_logits, labels, targets, student_features=student_features, stage=stage)

    def compute(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor | None,
        targets: Mapping[str, torch.Tensor],
        *,
        student_features: torch.Tensor | None,
        stage: str | None,
    ) -> LossOutput:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())

    # -- shared checks ----------------------------------------------------------------
    def _fields_needed(self, stage: str | None) -> frozenset[str]:
        return self.needs

    def _check_call(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor | None,
        targets: Mapping[str, torch.Tensor],
        stage: str | None,
    ) -> bool | None:
        """Raise on a malformed call; return whether every label is >= 0 (None when the labels
        were not inspected) so that the loss can skip masking unlabelled rows."""
        _check_logits(student_logits)
        batch, num_classes = student_logits.shape
        if self.num_classes is not None and num_classes != self.num_classes:
            raise InvalidTargetsError(
                f"student has {num_classes} output classes but the store has {self.num_classes}; "
                "build the student with the store's num_classes"
            )
        if stage is not None and stage not in self.stages:
            raise SpecError(f"method {self.name!r} has stages {list(self.stages)}, got stage={stage!r}")
        nonnegative: bool | None = None
        if labels is None:
            if self.requires_labels:
                raise InvalidTargetsError(
                    f"method {self.name!r} needs ground-truth labels but got labels=None (unlabelled "
                    "transfer set); use 'kd' or 'kd-topk', or a labelled store"
                )
        else:
            if labels.shape != (batch,):
                raise InvalidTargetsError(f"labels must be [B]={batch}, got shape {tuple(labels.shape)}")
            if not batch:
                nonnegative = True
            elif self._should_check_labels(labels):
                lo, hi = (int(v) for v in torch.aminmax(labels))  # one reduction, one read-back
                if hi >= num_classes:
                    raise InvalidTargetsError(f"label {hi} is out of range for {num_classes} classes")
                if lo < 0 and self.requires_labels:
                    raise InvalidTargetsError(
                        f"method {self.name!r} needs a label for every sample but the batch has "
                        "unlabelled samples (label < 0); use 'kd'/'kd-topk' or drop unlabelled rows"
                    )
                nonnegative = lo >= 0
                if labels.device.type != "cpu":
                    self._labels_checked = True
            elif self.requires_labels:
                nonnegative = True  # the contract of these methods (checked on the first batch)
        needed = self._fields_needed(stage)
        prefix = self.prepared_prefix
        if prefix is not None and prefix + "probs" in targets:
            needed = (prefix + "probs", prefix + "log_probs")
        missing = [name for name in needed if name not in targets]
        if missing:
            missing.sort()
            other = sorted({n.rsplit("/", 1)[0] for n in targets if n.startswith(PREPARED_PREFIX)})
            if other:
                raise InvalidTargetsError(
                    f"targets were prepared for {other[0]!r}, not for this method ({(prefix or self.name)!r}); "
                    "build the dataset with this method (DistillDataset.for_method)"
                )
            raise InvalidTargetsError(
                f"method {self.name!r} needs store field(s) {missing} in targets (got {sorted(targets)}); "
                "read them from the store (or re-dump with them)"
            )
        for name in needed:
            t = targets[name]
            if t.shape[0] != batch:
                raise InvalidTargetsError(f"targets[{name!r}] has {t.shape[0]} rows, the batch has {batch}")
            if name == LOGSUMEXP and t.dim() != 1:
                raise InvalidTargetsError(
                    f"targets['logsumexp'] must be [B] (the column for T={self.temperature:g}), got shape "
                    f"{tuple(t.shape)}; read with temperature={self.temperature:g}"
                )
        return nonnegative

    def _should_check_labels(self, labels: torch.Tensor) -> bool:
        if self.check_labels not in ("auto", "always"):
            raise SpecError(f"check_labels must be 'auto' or 'always', got {self.check_labels!r}")
        return self.check_labels == "always" or labels.device.type == "cpu" or not self._labels_checked


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise SpecError(f"{name} must be > 0, got {value}")
    return value


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:
        raise SpecError(f"{name} must be >= 0, got {value}")
    return value
