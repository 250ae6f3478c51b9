"""Hinton KD, ``ce_weight * CE + kd_weight * T^2 * KL``, as one autograd node.

The T^2 factor of Hinton et al. lives here, not in :func:`~softlabels.losses.kl_divergence`:
the divergence is the plain per-sample KL at temperature T, and :func:`kd_loss` multiplies it
by ``T**2`` so that its gradient wrt the student logits, ``T * (q(T) - p(T)) / B``, keeps the
same magnitude when T changes.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from softlabels.errors import SpecError
from softlabels.losses.functional import (
    LossOutput,
    _check_probs,
    _cross_entropy,
    _nonnegative_if_cheap,
    _upcast,
    _zero_like_graph,
    cross_entropy,
    kl_divergence,
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

    Computed by one fused autograd node (:class:`_FusedKD`: no per-op graph, closed-form
    gradient) unless ``teacher_probs`` itself requires grad, in which case the plain graph of
    :func:`kl_divergence` + :func:`cross_entropy` is used so that the teacher gets gradients.
    Higher-order gradients (``create_graph=True``) work either way.
    """
    _check_probs(student_logits, teacher_probs)
    if not temperature > 0:
        raise SpecError(f"temperature must be > 0, got {temperature}")
    if not teacher_probs.requires_grad:
        target = TeacherTarget(probs=teacher_probs)
        all_labelled = None if labels is None else _nonnegative_if_cheap(labels)
        return _fused_kd(student_logits, labels, target, float(temperature), ce_weight, kd_weight, all_labelled)
    kd = float(temperature) ** 2 * kl_divergence(student_logits, teacher_probs, temperature)
    total = kd_weight * kd
    components = {"kd": kd.detach()}
    if labels is not None:
        ce = cross_entropy(student_logits, labels)
        total = total + ce_weight * ce
        components = {"ce": ce.detach(), **components}
    return LossOutput(total, components)


def _graph_kd_total(logits, labels, target, temperature, ce_weight, kd_weight):
    """The plain-graph form of :class:`_FusedKD`'s total (for ``create_graph=True``)."""
    p = target.dense(logits.shape[-1], _upcast(logits).dtype)
    total = kd_weight * (temperature**2 * kl_divergence(logits, p, temperature))
    if labels is not None:
        total = total + ce_weight * cross_entropy(logits, labels)
    return total


@functools.lru_cache(maxsize=8)
def _minus_ones(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only ``[rows, 1]`` column of -1 (the one-hot subtracted in the CE gradient),
    kept instead of allocated every backward."""
    return torch.full((rows, 1), -1.0, dtype=dtype, device=device)


class _FusedKD(torch.autograd.Function):
    """``total = kd_weight * T^2 * KL(p || q_T) + ce_weight * CE(z, y)`` as one autograd node.

    Forward: the formulas of :func:`kl_divergence` and :func:`cross_entropy` (``0 log 0 = 0``
    even where ``log q = -inf``; unlabelled rows masked; batch means; empty batch -> 0),
    evaluated without recording a graph, in float32 (float64 stays float64). The KL is one dot
    product ``<p, log p - log q_T>`` (plus one per-row tail term for a sparse target with
    ``k < C``). Returns ``(total, T^2 KL, CE)``; the last two are non-differentiable (the
    logged components). The gradient, in closed form, ``dtotal/dz = kd_weight * T *
    (s * q_T - p) / B + ce_weight * mask * (q_1 - onehot(y)) / n``, ``q_T = softmax(z / T)``,
    ``s = sum_c p`` (taken as 1 for a ``normalised`` target), ``n`` = labelled rows, is also
    computed in the forward (when the logits require grad), in place over the log-softmaxes
    that are no longer needed; the backward hands it over (times the incoming gradient unless
    that is 1). Under ``create_graph=True``, or a second backward through a retained graph, it
    differentiates the plain graph instead, so higher-order gradients are exact as well.

    Kept only while it pays for itself on a CNN student (``benchmarks/train_overhead.py``, the
    "fused vs autograd" lines; BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, logits, labels, target, temperature, ce_weight, kd_weight, all_labelled):
        z = _upcast(logits)
        batch, num_classes = z.shape
        ctx.save_for_backward(logits)
        ctx.labels, ctx.target, ctx.hp, ctx.grad = labels, target, (temperature, ce_weight, kd_weight), None
        if batch == 0:
            total, kd, ce = z.new_zeros(()), z.new_zeros(()), z.new_zeros(())
            ctx.mark_non_differentiable(kd, ce)
            return total, kd, ce
        dtype = z.dtype
        logq = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        p = _as(target.probs, dtype)
        logp = torch.log(p) if target.log_probs is None else _as(target.log_probs, dtype)
        fill = None
        if target.index is None:
            parts = [(p, logp, logq)]
        else:
            lq = logq.gather(-1, target.index)
            parts = [(p, logp, lq)]
            if target.fill is not None:  # the C - k other classes, at `fill` each: one term per row
                fill = _as(target.fill, dtype)
                n_tail = num_classes - target.index.shape[-1]
                tail_logq = (logq.sum(-1, keepdim=True) - lq.sum(-1, keepdim=True)) / n_tail  # their mean log q
                parts.append((n_tail * fill, _as(target.log_fill, dtype), tail_logq))
        kd = _sum_p_log_ratio(parts) * (temperature * temperature / batch)
        mass = None
        if not target.normalised:
            mass = p.sum(-1, keepdim=True)
            if fill is not None:
                mass = mass + n_tail * fill
        logp1 = y = scale = None
        if labels is None:
            ce = z.new_zeros(())
            total = kd * kd_weight
        else:
            logp1 = logq if temperature == 1.0 else torch.log_softmax(z, dim=-1)
            y = labels.long()
            if all_labelled:
                ce = F.nll_loss(logp1, y)
            else:
                mask = y >= 0
                y = y.clamp(min=0)
                scale = (mask / mask.sum().clamp(min=1).to(dtype)).unsqueeze(-1)  # 1/n on labelled rows, else 0
                ce = -(logp1.gather(-1, y.unsqueeze(-1)) * scale).sum()
            total = torch.add(kd * kd_weight, ce, alpha=ce_weight)
        if ctx.needs_input_grad[0]:
            # q_T, then q_1: exponentiated in place (logp1 may be logq itself when T = 1)
            grad = logq.exp() if logp1 is logq else logq.exp_()
            if mass is not None:
                grad.mul_(mass)
            if target.index is None:
                grad.sub_(p)
            elif fill is None:
                grad.scatter_add_(-1, target.index, -p)
            else:
                grad.sub_(fill).scatter_add_(-1, target.index, fill - p)
            grad.mul_(kd_weight * temperature / batch)
            if logp1 is not None and ce_weight != 0.0:
                q1 = logp1.exp_()
                q1.scatter_add_(-1, y.unsqueeze(-1), _minus_ones(batch, dtype, q1.device))  # q_1 - onehot(y)
                if scale is None:
                    grad.add_(q1, alpha=ce_weight / batch)
                else:
                    grad.addcmul_(q1, scale, value=ce_weight)
            ctx.grad = grad
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        none = (None,) * 6
        (logits,) = ctx.saved_tensors
        if logits.shape[0] == 0:
            return (torch.zeros_like(logits), *none)
        grad, ctx.grad = ctx.grad, None  # handed over once: autograd may accumulate into it
        if grad is None or torch.is_grad_enabled():
            # create_graph=True, or a second backward through a retained graph: the plain graph
            temperature, ce_weight, kd_weight = ctx.hp
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                total = _graph_kd_total(logits, ctx.labels, ctx.target, temperature, ce_weight, kd_weight)
                (grad,) = torch.autograd.grad(total, logits, grad_total, create_graph=create_graph)
            return (grad, *none)
        # On the CPU the incoming scalar is read for free (it is 1 from .backward()); elsewhere
        # reading it would be a device sync, so it is multiplied in.
        if grad_total.device.type != "cpu" or float(grad_total) != 1.0:
            grad = grad * grad_total
        return (_as(grad, logits.dtype), *none)


def kd_output(logits, labels, target: TeacherTarget, temperature, ce_weight, kd_weight, all_labelled) -> LossOutput:
    """:func:`kd_loss` on a target in any :class:`TeacherTarget` form, as plain torch ops whose
    gradient autograd derives (the same values as :class:`_FusedKD`). The KL is one dot product
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
    on the CPU (where reading a scalar is free) the masked sum -- two more passes, the slowest
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


def _fused_kd(logits, labels, target, temperature, ce_weight, kd_weight, all_labelled) -> LossOutput:
    """:class:`_FusedKD` wrapped as a :class:`LossOutput` (components ``{"ce", "kd"}``)."""
    total, kd, ce = _FusedKD.apply(logits, labels, target, temperature, ce_weight, kd_weight, all_labelled)
    return LossOutput(total, {"kd": kd} if labels is None else {"ce": ce, "kd": kd})
