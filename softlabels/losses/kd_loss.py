"""Hinton KD, ``ce_weight * CE + kd_weight * T^2 * KL``, on a :class:`~softlabels.targets.TeacherTarget`.

The T^2 factor of Hinton et al. lives here, not in :func:`~softlabels.losses.kl_divergence`:
the divergence is the plain per-sample KL at temperature T, and :func:`kd_loss` multiplies it
by ``T**2`` so that its gradient wrt the student logits, ``T * (q(T) - p(T)) / B``, keeps the
same magnitude when T changes. Autograd derives the gradient: a hand-written one saved too
little of a CNN student's step to keep (BENCHMARKS.md, "Fused KD node vs autograd").
"""

from __future__ import annotations

import math

import torch

from softlabels.errors import SpecError
from softlabels.losses.functional import (
    LossOutput,
    _check_probs,
    _cross_entropy,
    _nonnegative_if_cheap,
    _upcast,
    _zero_like_graph,
)
from softlabels.targets import TeacherTarget, _as


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> LossOutput:
    """Hinton et al. (2015) KD:
    ``ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(p_t(T) || softmax(z_s / T))``.

    ``student_logits [B, C]``, ``teacher_probs [B, C]`` (teacher distribution at T),
    ``labels [B]`` or None. ``labels=None`` (unlabelled transfer set): the CE term is dropped,
    ``ce_weight`` is ignored and ``total = kd_weight * T^2 * KL`` (no renormalisation).
    Components: ``{"ce": CE, "kd": T^2 * KL}`` (``"ce"`` absent without labels).
    Defaults T=4, 0.1/0.9 are the RepDistiller/mdistiller CIFAR-100 settings.

    A ``teacher_probs`` that requires grad (a learnable target) gets gradients too.
    """
    _check_probs(student_logits, teacher_probs)
    if not temperature > 0:
        raise SpecError(f"temperature must be > 0, got {temperature}")
    all_labelled = None if labels is None else _nonnegative_if_cheap(labels)
    target = TeacherTarget(probs=teacher_probs)
    return kd_output(student_logits, labels, target, float(temperature), ce_weight, kd_weight, all_labelled)


def kd_output(logits, labels, target: TeacherTarget, temperature, ce_weight, kd_weight, all_labelled) -> LossOutput:
    """:func:`kd_loss` on a target in any :class:`TeacherTarget` form, as plain torch ops whose
    gradient autograd derives. The KL is one dot product
    ``<p, log p - log q_T>`` (plus one per-row tail term for a sparse target with ``k < C``);
    ``0 log 0 = 0`` even where ``log q = -inf``; unlabelled rows are masked out of CE."""
    z = _upcast(logits)
    batch, num_classes = z.shape
    if batch == 0:
        zero = _zero_like_graph(logits)
        return LossOutput(zero, {"kd": zero.detach()} if labels is None else {"ce": zero.detach(), "kd": zero.detach()})
    dtype = z.dtype
    logq = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    p = _as(target.probs, dtype)
    logp = torch.log(torch.where(p > 0, p, 1.0)) if target.log_probs is None else _as(target.log_probs, dtype)
    if target.index is None:
        parts = [(p, logp, logq)]
    else:
        lq = logq.gather(-1, target.index)
        parts = [(p, logp, lq)]
        if target.fill is not None:  # the C - k other classes, at `fill` each: one term per row
            n_tail = num_classes - target.index.shape[-1]
            tail_logq = (logq.sum(-1, keepdim=True) - lq.sum(-1, keepdim=True)) / n_tail  # their mean log q
            parts.append((n_tail * _as(target.fill, dtype), _as(target.log_fill, dtype), tail_logq))
    kd = _sum_p_log_ratio(parts) * (temperature * temperature / batch)
    if labels is None:
        return LossOutput(kd * kd_weight, {"kd": kd.detach()})
    ce = _cross_entropy(z, labels.long(), all_labelled)
    return LossOutput(kd * kd_weight + ce_weight * ce, {"ce": ce.detach(), "kd": kd.detach()})


def _sum_p_log_ratio(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum p * (log p - log q)`` over all elements of all ``(p, log p, log q)`` parts (one dot
    product each), with ``0 * log 0 = 0`` terms even where ``log p`` or ``log q`` is ``-inf``.
    Such a term is the only way the plain sum turns NaN (``0 * inf``) other than NaN inputs, so
    on the CPU (where reading a scalar is free) the masked sum -- more passes, the slowest
    elementwise ones here -- is taken only when the plain one is NaN; otherwise the two are
    equal. Elsewhere (a read-back would be a device sync) it is always masked."""
    if parts[0][0].device.type == "cpu":
        total = None
        for p, logp, logq in parts:
            s = torch.vdot(p.reshape(-1), (logp - logq).reshape(-1))
            total = s if total is None else total + s
        if not math.isnan(total.item()):
            return total
    total = None
    for p, logp, logq in parts:
        s = torch.where(p > 0, p * (logp - logq), 0.0).sum()
        total = s if total is None else total + s
    return total
