"""The pure losses on tensors: they know nothing about stores or methods.

Conventions (as torchtune's ``kd_losses``): argument order is student, teacher, labels;
log-softmaxes are computed in float32 (float64 inputs stay float64); every loss is a mean
over the batch of a per-sample quantity (KL summed over classes, i.e. PyTorch's
``'batchmean'``, never ``'mean'`` which would also divide by C); an empty batch gives a zero
that still has a ``grad_fn`` (never NaN). ``B`` = batch, ``C`` = classes, ``T`` = temperature.
:func:`softlabels.losses.kd_loss` (Hinton KD, with its ``T^2``) lives in ``kd_loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softlabels.errors import InvalidTargetsError, SpecError


@dataclass(frozen=True)
class LossOutput:
    """What every method returns.

    ``total``: scalar to call ``backward()`` on. ``components``: detached, *unweighted*
    scalar terms for logging, such that ``total == sum(weight[name] * components[name])``
    (e.g. ``{"ce": CE, "kd": T^2 * KL}`` with weights ``ce_weight``/``kd_weight``).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]

    def scalars(self) -> dict[str, float]:
        """``{"total": ..., **components}`` as Python floats (one host sync), for loggers."""
        return {"total": float(self.total.detach()), **{k: float(v) for k, v in self.components.items()}}


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------
def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16/float32 -> float32; float64 stays float64 (for exact references)."""
    return x if x.dtype == torch.float64 else x.float()


def _zero_like_graph(anchor: torch.Tensor) -> torch.Tensor:
    """A 0 that is still connected to ``anchor``'s graph, so ``backward()`` works on it."""
    return _upcast(anchor).sum() * 0.0


def _batch_mean(per_sample: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean over the batch; 0 (with grad) for an empty batch instead of 0/0 = NaN."""
    if per_sample.numel() == 0:
        return _zero_like_graph(anchor)
    return per_sample.mean()


def _check_logits(student_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise InvalidTargetsError(
            f"student logits must be [B, C], got shape {tuple(student_logits.shape)}; flatten extra dims first"
        )


def _check_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    _check_logits(student_logits)
    if teacher_probs.shape != student_logits.shape:
        raise InvalidTargetsError(
            f"teacher probabilities {tuple(teacher_probs.shape)} and student logits "
            f"{tuple(student_logits.shape)} must have the same [B, C] shape"
        )


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy, mean over the *labelled* samples of the batch.

    ``student_logits [B, C]``, ``labels [B]`` (int). A negative label marks an unlabelled
    sample (the store's convention): it contributes nothing and is not counted in the mean,
    like PyTorch's ``ignore_index``. No labelled sample (or B = 0) -> 0 with grad, not NaN.
    """
    _check_logits(student_logits)
    return _cross_entropy(_upcast(student_logits), labels.long(), _nonnegative_if_cheap(labels))


def _nonnegative_if_cheap(labels: torch.Tensor) -> bool | None:
    """Whether every label is >= 0, when that costs no device sync (CPU tensors); else None."""
    if labels.device.type != "cpu":
        return None
    return labels.numel() == 0 or int(labels.min()) >= 0


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, all_labelled: bool | None) -> torch.Tensor:
    """:func:`cross_entropy` on already upcast logits and int64 labels. ``all_labelled=True``
    (the caller knows every label is >= 0) takes PyTorch's fused kernel; otherwise negative
    labels are masked out without reading anything back to the host."""
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    if all_labelled:
        return F.cross_entropy(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    mask = labels >= 0
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    count = mask.sum().clamp(min=1).to(nll.dtype)
    return (nll * mask).sum() / count


def _student_log_probs(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise SpecError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(_upcast(student_logits) / float(temperature), dim=-1)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``mean_b [ -sum_c p[b,c] * log q_T[b,c] ]`` with ``q_T = softmax(student_logits / T)``.

    ``student_logits [B, C]``; ``teacher_probs [B, C]`` must already be the teacher
    distribution *at the same T* (rows sum to 1). Terms with ``p = 0`` are exactly 0 even if
    ``log q = -inf``. No ``T^2`` factor here. Equals :func:`kl_divergence` + H(p): same
    gradient, different constant.
    """
    _check_probs(student_logits, teacher_probs)
    logq = _student_log_probs(student_logits, temperature)
    p = teacher_probs.to(logq.dtype)
    per_sample = -torch.where(p > 0, p * logq, torch.zeros_like(logq)).sum(-1)
    return _batch_mean(per_sample, student_logits)


def kl_divergence(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(p || q_T)`` summed over classes, averaged over the batch ('batchmean').

    ``student_logits [B, C]``; ``teacher_probs [B, C]`` already at temperature T.
    ``0 * log 0 = 0``: teacher zeros (e.g. LS with eps=0, a KD-pt row at T -> 0) give finite
    values and gradients. No ``T^2`` factor (see :func:`kd_loss`). Returns a scalar.
    """
    _check_probs(student_logits, teacher_probs)
    logq = _student_log_probs(student_logits, temperature)
    p = teacher_probs.to(logq.dtype)
    pos = p > 0
    logp = torch.log(torch.where(pos, p, torch.ones_like(p)))
    per_sample = torch.where(pos, p * (logp - logq), torch.zeros_like(logq)).sum(-1)
    return _batch_mean(per_sample, student_logits)


def label_smoothing_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy against ``(1 - eps) * onehot(y) + eps / C`` (Szegedy et al. 2016),
    mean over the batch; equals ``F.cross_entropy(..., label_smoothing=eps)``.

    ``student_logits [B, C]``, ``labels [B]`` (all >= 0). It is KD at T=1 against a uniform
    teacher, up to the constant entropy of the target (same gradient as
    ``kd_loss(z, ls_target, None, temperature=1, kd_weight=1)``).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise SpecError(f"epsilon must lie in [0, 1], got {epsilon}")
    _check_logits(student_logits)
    if student_logits.shape[0] == 0:
        return _zero_like_graph(student_logits)
    # PyTorch's kernel computes the same closed form, (1 - eps) * nll - eps / C * sum_c log q_c,
    # with no [B, C] target, in the (upcast) logits' dtype.
    return F.cross_entropy(_upcast(student_logits), labels.long(), label_smoothing=float(epsilon))


def hint_loss(regressed: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss as mean squared error averaged over *every element* (``[B, D]`` or
    ``[B, C, H, W]``), i.e. ``nn.MSELoss()``.

    FitNets writes ``1/2 ||u - r(v)||^2`` (a per-sample sum); we use the per-element mean of
    RepDistiller/mdistiller so that their ``hint_weight = 100`` transfers unchanged and the
    scale does not depend on the feature size. Empty batch -> 0 with grad.
    """
    if regressed.shape != teacher_features.shape:
        raise InvalidTargetsError(
            f"regressed student features {tuple(regressed.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ; check the hint layer and the store's feature array"
        )
    if regressed.numel() == 0:
        return _zero_like_graph(regressed)
    r = _upcast(regressed)
    return F.mse_loss(r, teacher_features.to(r.dtype), reduction="mean")
