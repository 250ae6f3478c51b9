"""``hint``: FitNets hints, a regressor from the student's hint layer to a stored teacher feature."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fields import FEATURES_PREFIX, TOPK_FIELDS
from softlabels.losses.functional import LossOutput, _cross_entropy, _upcast, _zero_like_graph, hint_loss
from softlabels.losses.kd import KDMethod
from softlabels.losses.method import DistillationMethod, _non_negative, _positive
from softlabels.losses.registry import register_method

DEFAULT_FEATURE = "penultimate"  # the input of the student's and the teacher's classifier


def _shape(value: int | Sequence[int] | None, what: str) -> tuple[int, ...]:
    if value is None:
        raise SpecError(f"hint needs {what} (per-sample shape, e.g. (512,) or (64, 8, 8))")
    shape = (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise SpecError(f"{what} must be (D,) or (C, H, W) with positive sizes, got {shape}")
    return shape


class HintRegressor(nn.Module):
    """FitNets regressor from the student's hint layer to the teacher's feature space.

    ``student_shape`` / ``teacher_shape`` are per-sample shapes: ``(D_s,) -> (D_t,)`` uses
    ``nn.Linear``; ``(C_s, H, W) -> (C_t, H, W)`` uses a 1x1 ``nn.Conv2d`` (same H, W; pool or
    pick another layer otherwise). Purely linear, no BN/ReLU: stored features may be negative.
    """

    def __init__(self, student_shape: int | Sequence[int], teacher_shape: int | Sequence[int]) -> None:
        super().__init__()
        self.student_shape = _shape(student_shape, "student_feature_shape")
        self.teacher_shape = _shape(teacher_shape, "teacher_feature_shape")
        if len(self.student_shape) != len(self.teacher_shape):
            raise SpecError(
                f"student hint shape {self.student_shape} and teacher feature shape {self.teacher_shape} "
                "must both be vectors (D,) or both maps (C, H, W)"
            )
        if len(self.student_shape) == 1:
            self.proj: nn.Module = nn.Linear(self.student_shape[0], self.teacher_shape[0])
        else:
            if self.student_shape[1:] != self.teacher_shape[1:]:
                raise SpecError(
                    f"student map {self.student_shape} and teacher map {self.teacher_shape} have different "
                    "spatial sizes; a 1x1 conv regressor needs equal H, W (pool the student map or choose "
                    "another hint layer)"
                )
            self.proj = nn.Conv2d(self.student_shape[0], self.teacher_shape[0], kernel_size=1)

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        """``[B, *student_shape] -> [B, *teacher_shape]``."""
        if tuple(student_features.shape[1:]) != self.student_shape:
            raise InvalidTargetsError(
                f"student hint features have per-sample shape {tuple(student_features.shape[1:])}, "
                f"the regressor was built for {self.student_shape}"
            )
        w = next(self.proj.parameters())
        return self.proj(student_features.to(w.dtype))


@register_method("hint")
class HintMethod(DistillationMethod):
    """FitNets hints: a :class:`HintRegressor` maps the student's hint layer
    (``student_features``) to the stored teacher feature ``features/<feature>``; MSE loss.

    ``normalize=True`` (default) regresses ``(t - mean) / std`` of the stored feature ``t``, with
    the mean and std of every stored value of it (``teacher_feature_stats`` = (mean, rms), which the
    trainer takes from the store's ``summary.features``), so that the
    default ``hint_weight`` suits any teacher: a torchvision teacher's raw penultimate features
    can have an RMS above 1,000, which makes a raw MSE 10^6 times larger. ``normalize=False``
    regresses the raw features.

    ``mode="joint"`` (default; RepDistiller/mdistiller): every step
    ``ce_weight * CE + hint_weight * MSE (+ kd_weight * T^2 * KL)`` with defaults
    ce_weight=1, hint_weight=100, kd_weight=0. Single loop, no schedule to get wrong.

    ``mode="two-stage"`` (FitNets): stage ``"hint"`` for the first ``hint_epochs`` epochs
    (default ``max(1, E // 4)`` of ``E`` total, leaving >= 1 KD epoch when E >= 2) with loss
    ``hint_weight * MSE`` only (gradients reach only the layers below the hint and the
    regressor), then stage ``"kd"``: ``ce_weight * CE + kd_weight * T^2 * KL`` from the stored
    top-k with defaults 0.1/0.9. The trainer asks ``method.stage(epoch, E)`` and passes the
    answer as ``stage=``; it must be given in this mode.
    Components: ``{"ce", "hint", "kd"}`` -- whichever terms the stage uses.
    """

    reads_store = True
    store_constants = frozenset({"teacher_feature_shape", "teacher_feature_stats"})

    def __init__(
        self,
        *,
        mode: str = "joint",
        hint_weight: float = 100.0,
        ce_weight: float | None = None,
        kd_weight: float | None = None,
        temperature: float = 4.0,
        hint_epochs: int | None = None,
        feature: str = DEFAULT_FEATURE,
        normalize: bool = True,
        student_feature_shape: int | Sequence[int] | None = None,
        teacher_feature_shape: int | Sequence[int] | None = None,
        teacher_feature_stats: Sequence[float] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes)
        if mode not in ("joint", "two-stage"):
            raise SpecError(f"hint mode must be 'joint' or 'two-stage', got {mode!r}")
        self.mode = mode
        two = mode == "two-stage"
        self.hint_weight = _non_negative("hint_weight", hint_weight)
        self.ce_weight = _non_negative("ce_weight", (0.1 if two else 1.0) if ce_weight is None else ce_weight)
        self.kd_weight = _non_negative("kd_weight", (0.9 if two else 0.0) if kd_weight is None else kd_weight)
        self.temperature = _positive("temperature", temperature)
        if hint_epochs is not None and (not two or int(hint_epochs) < 0):
            raise SpecError("hint_epochs applies to mode='two-stage' only and must be >= 0")
        self.hint_epochs = None if hint_epochs is None else int(hint_epochs)
        self.feature_key = feature if feature.startswith(FEATURES_PREFIX) else FEATURES_PREFIX + feature
        self.regressor = HintRegressor(
            _shape(student_feature_shape, "student_feature_shape"),
            _shape(teacher_feature_shape, "teacher_feature_shape"),
        )
        self.uses_features = True
        # normalise the stored teacher feature to zero mean, unit variance (one scalar each, from the
        # store's summary): hint_weight then means the same for any teacher, whatever its feature scale
        # (the trainer passes the store's figures; without them the raw features are regressed, and
        # hparams say normalize=False)
        self.normalize = bool(normalize) and teacher_feature_stats is not None
        self.feature_shift, self.feature_scale = 0.0, 1.0
        if self.normalize:
            mean, rms = (float(v) for v in teacher_feature_stats)
            self.feature_shift = mean
            self.feature_scale = max(math.sqrt(max(rms * rms - mean * mean, 0.0)), 1e-6)
        self.stages = ("hint", "kd") if two else ("main",)
        kd_fields = TOPK_FIELDS if self.kd_weight > 0 else frozenset()
        self.needs = frozenset({self.feature_key}) | kd_fields
        self.hparams = {
            "mode": mode,
            "hint_weight": self.hint_weight,
            "ce_weight": self.ce_weight,
            "kd_weight": self.kd_weight,
            "temperature": self.temperature,
            "hint_epochs": self.hint_epochs,
            "feature": self.feature_key,
            "normalize": self.normalize,
            "feature_mean": self.feature_shift if self.normalize else None,
            "feature_std": self.feature_scale if self.normalize else None,
        }
        self._kd = KDMethod(temperature=self.temperature, ce_weight=self.ce_weight, kd_weight=self.kd_weight)

    @classmethod
    def feature_layer(cls, hparams):
        return str(hparams.get("feature") or DEFAULT_FEATURE).removeprefix(FEATURES_PREFIX)

    def run_metrics(self, stages_run):
        return {"hint_mode": self.mode, "hint_stages": stages_run}

    def stage(self, epoch: int, total_epochs: int) -> str:
        if self.mode == "joint":
            return "main"
        n_hint = self.hint_epochs
        if n_hint is None:
            n_hint = min(max(1, total_epochs // 4), max(total_epochs - 1, 0))
        return "hint" if epoch < n_hint else "kd"

    def _fields_needed(self, stage):
        if stage == "hint":
            return frozenset({self.feature_key})
        if stage == "kd":
            return self.needs - {self.feature_key}
        return self.needs

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        if self.mode == "two-stage" and stage is None:
            raise SpecError("hint mode='two-stage' needs stage='hint' or 'kd': pass stage=method.stage(epoch, epochs)")
        components: dict[str, torch.Tensor] = {}
        total = _zero_like_graph(student_logits)
        if stage in (None, "main", "hint"):
            if student_features is None:
                raise InvalidTargetsError(
                    "method 'hint' needs student_features (the output of the student's hint layer)"
                )
            teacher = targets[self.feature_key]
            if tuple(teacher.shape[1:]) != self.regressor.teacher_shape:
                raise InvalidTargetsError(
                    f"targets[{self.feature_key!r}] has per-sample shape {tuple(teacher.shape[1:])}, "
                    f"expected {self.regressor.teacher_shape}"
                )
            if self.normalize:
                teacher = (teacher.float() - self.feature_shift) / self.feature_scale
            hint = hint_loss(self.regressor(student_features), teacher)
            total = total + self.hint_weight * hint
            components["hint"] = hint.detach()
        if stage in (None, "main", "kd"):
            if self.kd_weight > 0:
                kd = self._kd.loss(student_logits, labels, targets, self._labels_nonnegative)
                total = total + kd.total
                components.update(kd.components)
            elif labels is not None:
                ce = _cross_entropy(_upcast(student_logits), labels.long(), self._labels_nonnegative)
                total = total + self.ce_weight * ce
                components["ce"] = ce.detach()
        return LossOutput(total, components)
