"""The label-only methods: ``ce`` (the no-teacher baseline) and ``ls`` (label smoothing)."""

from __future__ import annotations

from softlabels.errors import SpecError
from softlabels.losses.functional import LossOutput, _cross_entropy, _upcast, label_smoothing_loss
from softlabels.losses.method import DistillationMethod
from softlabels.losses.registry import register_method


@register_method("ce")
class CrossEntropyMethod(DistillationMethod):
    """Plain hard-label training, the no-teacher baseline. Components ``{"ce"}``."""

    requires_labels = True

    def __init__(self, *, num_classes: int | None = None) -> None:
        super().__init__(num_classes=num_classes)

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        ce = _cross_entropy(_upcast(student_logits), labels.long(), self._labels_nonnegative)
        return LossOutput(ce, {"ce": ce.detach()})


@register_method("ls")
class LabelSmoothingMethod(DistillationMethod):
    """Label smoothing, eps=0.1 (Szegedy et al. 2016): KD with a uniform teacher, the baseline
    that isolates the 'regularisation' part of KD (Tang et al. 2020). Components ``{"ls"}``."""

    requires_labels = True

    def __init__(self, *, epsilon: float = 0.1, num_classes: int | None = None) -> None:
        super().__init__(num_classes=num_classes)
        epsilon = float(epsilon)
        if not 0.0 <= epsilon <= 1.0:
            raise SpecError(f"epsilon must lie in [0, 1], got {epsilon}")
        self.epsilon = epsilon
        self.hparams = {"epsilon": epsilon}

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        loss = label_smoothing_loss(student_logits, labels, epsilon=self.epsilon)
        return LossOutput(loss, {"ls": loss.detach()})
