"""``kd-pt`` (Tang et al. 2020): KD from the teacher's probability on the true class only."""

from __future__ import annotations

from softlabels.fields import LABEL_LOGIT, LOGSUMEXP, PT_FIELDS
from softlabels.losses.kd import _KDMethod
from softlabels.losses.registry import register_method
from softlabels.targets import TeacherTarget


@register_method("kd-pt")
class KDGroundTruthMethod(_KDMethod):
    """KD-pt (Tang et al. 2020): only the teacher's probability on the true class,
    ``p_t[y] = exp(z_y / T - lse_T)``, and ``1 - p_t[y]`` uniform over the other classes."""

    requires_labels = True
    needs = PT_FIELDS

    def target(self, labels, targets, num_classes):
        return TeacherTarget.ground_truth(targets[LABEL_LOGIT], targets[LOGSUMEXP], labels, self.temperature, num_classes)
