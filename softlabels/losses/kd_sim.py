"""``kd-sim`` and ``kd-pt+sim`` (Tang et al. 2020): synthetic teachers from the class geometry."""

from __future__ import annotations

import torch

from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fields import LABEL_LOGIT, LOGSUMEXP, PT_FIELDS
from softlabels.losses.kd import _KDMethod
from softlabels.losses.method import _positive
from softlabels.losses.registry import register_method
from softlabels.targets import TeacherTarget, ground_truth_distribution, similarity_distribution


def _similarity_table(classifier_weight: torch.Tensor | None, rho: float, temperature: float, name: str):
    if classifier_weight is None:
        raise SpecError(
            f"method {name!r} needs the teacher's classifier weight [C, D]; dump the store with the "
            "classifier (classifier_weight) and pass it to build_method"
        )
    w = torch.as_tensor(classifier_weight)
    if w.dim() != 2 or w.shape[0] < 2:
        raise SpecError(f"classifier_weight must be [C, D] with C >= 2, got shape {tuple(w.shape)}")
    num_classes = w.shape[0]
    # Row y of the table is the KD-sim target for label y; computed once, indexed per batch.
    return similarity_distribution(w, torch.arange(num_classes), rho, temperature)


class _SimMethod(_KDMethod):
    """The KD-sim family: a similarity table from the teacher classifier weight, built once."""

    store_constants = frozenset({"classifier_weight"})

    def __init__(self, *, rho=1.0, temperature=4.0, ce_weight=0.1, kd_weight=0.9, classifier_weight=None,
                 num_classes=None) -> None:
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)
        self.rho = _positive("rho", rho)
        table = _similarity_table(classifier_weight, self.rho, self.temperature, self.name)
        if self.num_classes is not None and table.shape[0] != self.num_classes:
            raise SpecError(f"classifier_weight has {table.shape[0]} rows but num_classes={self.num_classes}")
        if self.num_classes is None:
            self.num_classes = table.shape[0]
        self.register_buffer("sim_table", table, persistent=False)
        # log of the table where it is > 0 (as kl_divergence computes it), indexed per batch
        self.register_buffer("sim_log_table", torch.log(torch.where(table > 0, table, 1.0)), persistent=False)
        self.hparams = {"rho": self.rho, **self.hparams}

    def _sim(self, labels: torch.Tensor) -> torch.Tensor:
        return self.sim_table[labels.long().to(self.sim_table.device)]


@register_method("kd-sim")
class KDSimilarityMethod(_SimMethod):
    """KD-sim (Tang et al. 2020): synthetic teacher ``softmax(cos(W_y, W_j)^rho / T)`` from the
    teacher classifier weight (class geometry only, no per-sample knowledge). Needs no
    per-sample store field, only ``classifier_weight`` at build time."""

    requires_labels = True
    needs = frozenset()

    def target(self, labels, targets, num_classes):
        if self.sim_table.shape[-1] != num_classes:
            raise InvalidTargetsError(
                f"the similarity table has {self.sim_table.shape[-1]} classes, the student {num_classes}"
            )
        y = labels.long().to(self.sim_table.device)
        return TeacherTarget(self.sim_table[y], self.sim_log_table[y])


@register_method("kd-pt+sim")
class KDGroundTruthSimilarityMethod(_SimMethod):
    """KD-pt+sim (Tang et al. 2020): the average ``(KD-pt + KD-sim) / 2`` of the two synthetic
    targets -- instance-level confidence plus class geometry."""

    requires_labels = True
    needs = PT_FIELDS

    def target(self, labels, targets, num_classes):
        # dense: the average of two distributions is one (its log is taken in the loss)
        pt = ground_truth_distribution(targets[LABEL_LOGIT], targets[LOGSUMEXP], labels, self.temperature, num_classes)
        return TeacherTarget(0.5 * (pt + self._sim(labels).to(pt.device)))
