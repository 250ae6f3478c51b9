"""Distillation losses and the method registry.

Two layers:

* pure functions on tensors (:func:`cross_entropy`, :func:`kl_divergence`, :func:`kd_loss`, ...)
  that know nothing about stores;
* *methods* (``ce``, ``ls``, ``kd``, ``kd-topk``, ``kd-pt``, ``kd-sim``, ``kd-pt+sim``,
  ``hint``), built by name with :func:`build_method`, that turn a batch of stored fields into
  the teacher distribution via :mod:`softlabels.targets` and call the pure functions.

Conventions (as torchtune's ``kd_losses``): argument order is student, teacher, labels;
log-softmaxes are computed in float32 (float64 inputs stay float64); every loss is a mean
over the batch of a per-sample quantity (KL summed over classes, i.e. PyTorch's
``'batchmean'``, never ``'mean'`` which would also divide by C); an empty batch gives a zero
that still has a ``grad_fn`` (never NaN). ``B`` = batch, ``C`` = classes, ``T`` = temperature.

The T^2 factor of Hinton et al. lives in :func:`kd_loss` (and the methods), not in
:func:`kl_divergence`: the divergence is the plain per-sample KL at temperature T, and
``kd_loss`` multiplies it by ``T**2`` so that its gradient wrt the student logits,
``T * (q(T) - p(T)) / B``, keeps the same magnitude when T changes.

Core module: depends on torch and :mod:`softlabels.targets` only.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.targets import (
    ground_truth_distribution,
    similarity_distribution,
    topk_distribution,
    topk_log_probs,
    uniform_label_smoothing,
)

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
]

# Store array names (mirrors softlabels.stores.format, kept literal so this core module does
# not import the storage layer).
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
LABEL_LOGIT = "label_logit"
FEATURES_PREFIX = "features/"
_TOPK_FIELDS = frozenset({TOPK_VALUES, TOPK_INDICES, LOGSUMEXP})
_PT_FIELDS = frozenset({LABEL_LOGIT, LOGSUMEXP})
#: Keys of loss-ready targets (:meth:`DistillationMethod.prepare_rows`) start with this.
PREPARED_PREFIX = "prepared/"
#: Prepared targets are scattered to dense ``[N, C]`` float32 rows (no gather/scatter per step)
#: when the two dense arrays (probabilities and their logs) fit in this many bytes.
PREPARED_DENSE_BYTES = 1 << 28
_PREPARE_CHUNK_ELEMENTS = 1 << 22  # rows are prepared this many [row, class] elements at a time


# --------------------------------------------------------------------------------------
# Output type
# --------------------------------------------------------------------------------------
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
        target = _Target(probs=teacher_probs)
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


# --------------------------------------------------------------------------------------
# Fused KD: one autograd node for ce_weight * CE + kd_weight * T^2 * KL
# --------------------------------------------------------------------------------------
class _Target:
    """A teacher distribution at T, ``[B, C]``, in the form that is cheapest to use.

    *Sparse* (``index`` given): ``probs``/``log_probs [B, k]`` at the classes ``index [B, k]``
    (int64) and, when ``k < C``, ``fill [B, 1]`` -- the probability of *each* of the other
    ``C - k`` classes -- with ``log_fill``. Top-k and KD-pt targets come in this form, so neither
    a dense ``[B, C]`` target nor its log is built in the forward pass. *Dense* (``index`` None):
    ``probs [B, C]``, ``log_probs`` optional (then computed in the forward).
    ``normalised``: rows sum to 1 by construction (up to rounding), so the gradient may use
    ``q - p`` instead of ``q * sum(p) - p``. Never requires grad.

    The *loss-ready* form (:func:`_loss_ready`, what :meth:`DistillationMethod.prepare_rows`
    delivers) has float32 (or float64) tensors and ``log_probs`` always, 0 wherever the
    probability is 0, so the forward's plain sum never meets ``0 * log 0``.
    """

    __slots__ = ("probs", "log_probs", "index", "fill", "log_fill", "normalised")

    def __init__(self, probs, log_probs=None, index=None, fill=None, log_fill=None, normalised=False) -> None:
        self.probs, self.log_probs, self.index = probs, log_probs, index
        self.fill, self.log_fill, self.normalised = fill, log_fill, normalised

    def dense(self, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``[B, C]`` distribution (one scatter for the sparse form)."""
        return _scatter_rows(self.probs, self.index, self.fill, num_classes, dtype)

    def fields(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors as prepared fields ``prefix + probs|log_probs|index|fill|log_fill``."""
        names = ("probs", "log_probs", "index", "fill", "log_fill")
        return {prefix + n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_fields(cls, targets: Mapping[str, torch.Tensor], prefix: str) -> _Target:
        """The inverse of :meth:`fields` (prepared targets are normalised distributions)."""
        get = targets.get
        return cls(targets[prefix + "probs"], targets[prefix + "log_probs"], get(prefix + "index"),
                   get(prefix + "fill"), get(prefix + "log_fill"), normalised=True)


def _scatter_rows(values, index, fill, num_classes, dtype) -> torch.Tensor:
    """``[B, C]`` rows: ``fill`` (or 0) everywhere, ``values`` at ``index``; ``values`` itself
    when ``index`` is None."""
    values = _as(values, dtype)
    if index is None:
        return values
    if fill is None:
        out = values.new_zeros(values.shape[0], num_classes)
    else:
        out = _as(fill, dtype).expand(values.shape[0], num_classes).clone()
    return out.scatter_(-1, index, values)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _loss_ready(target: _Target, num_classes: int, dense: bool) -> _Target:
    """``target`` in the form :meth:`DistillationMethod.prepare_rows` delivers: float32 (float64
    stays), contiguous, ``log_probs`` present with 0 where the probability is 0 (a ``0 * -inf``
    term would make the forward fall back to its masked sum), scattered to ``[B, C]`` when
    ``dense`` (then the forward needs no gather and the backward no scatter)."""
    dtype = torch.float64 if target.probs.dtype == torch.float64 else torch.float32
    p = _as(target.probs, dtype).contiguous()
    logp = torch.log(p) if target.log_probs is None else _as(target.log_probs, dtype)
    logp = torch.where(p > 0, logp, 0.0).contiguous()
    fill = log_fill = None
    if target.fill is not None:
        fill = _as(target.fill, dtype).contiguous()
        log_fill = torch.log(fill) if target.log_fill is None else _as(target.log_fill, dtype)
        log_fill = torch.where(fill > 0, log_fill, 0.0).contiguous()
    index = None if target.index is None else target.index.long().contiguous()
    if dense and index is not None:
        p = _scatter_rows(p, index, fill, num_classes, dtype)
        logp = _scatter_rows(logp, index, log_fill, num_classes, dtype)
        index = fill = log_fill = None
    return _Target(p, logp, index, fill, log_fill, normalised=target.normalised)


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

    Why: on small batches a loss is a few dozen tiny tensor ops whose cost is per-op overhead
    (dispatch, autograd bookkeeping, one backward node each); on large ones every pass over
    ``[B, C]`` counts. Here no graph is recorded, the gradient is a handful of in-place passes
    over tensors that are still in cache, and the Python backward node does almost nothing
    (measured: the same passes cost about twice as much inside the backward).
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


# --------------------------------------------------------------------------------------
# Methods and registry
# --------------------------------------------------------------------------------------
#: Store-level constants a trainer may pass to *every* :func:`build_method` call; a method
#: that does not use one ignores it (every other unknown keyword is an error).
STORE_CONSTANTS = frozenset({"num_classes", "classifier_weight", "teacher_feature_shape"})

_REGISTRY: dict[str, type[DistillationMethod]] = {}


class DistillationMethod(nn.Module):
    """Base class of a registered method: a loss from a batch of stored fields.

    Attributes a trainer reads: ``name``; ``needs`` (frozenset of per-sample store arrays the
    ``targets`` dict must hold); ``requires_labels``; ``temperature`` (select that
    ``logsumexp`` column when ``"logsumexp" in needs``; None if unused); ``uses_features``;
    ``stages``; ``hparams`` (resolved hyperparameters). It is an ``nn.Module`` so that any
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
        then carry the raw fields. :class:`softlabels.distill_data.DistillDataset` calls it once
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


def register_method(name: str) -> Callable[[type[DistillationMethod]], type[DistillationMethod]]:
    """Class decorator (timm-style): ``@register_method("kd-topk")``. Names are unique."""

    def decorator(cls: type[DistillationMethod]) -> type[DistillationMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, DistillationMethod)):
            raise TypeError(f"@register_method({name!r}) must decorate a DistillationMethod subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[DistillationMethod]:
    """The class registered under ``name``; SpecError listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}") from None


def method_defaults(name: str) -> dict[str, Any]:
    """Keyword arguments of method ``name`` with their defaults (``inspect.Parameter.empty``
    never appears: required build-time inputs default to None and are checked at build)."""
    sig = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


def build_method(name: str, **hparams: Any) -> DistillationMethod:
    """Instantiate method ``name`` with hyperparameters / store constants.

    Keys in :data:`STORE_CONSTANTS` that the method does not take are ignored so a trainer can
    pass the same store constants to every method; any other unknown key is a SpecError.
    """
    cls = method_class(name)
    accepted = method_defaults(name)
    unknown = sorted(k for k in hparams if k not in accepted and k not in STORE_CONSTANTS)
    if unknown:
        raise SpecError(
            f"method {name!r} has no hyperparameter(s) {unknown}; it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**{k: v for k, v in hparams.items() if k in accepted})


# -- label-only methods ------------------------------------------------------------------
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

    def teacher_distribution(self, labels: torch.Tensor, targets: Mapping[str, torch.Tensor], num_classes: int):
        """The LS target ``[B, C]``."""
        return uniform_label_smoothing(labels, num_classes, self.epsilon)

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        loss = label_smoothing_loss(student_logits, labels, epsilon=self.epsilon)
        return LossOutput(loss, {"ls": loss.detach()})


# -- KD family -------------------------------------------------------------------------
class _KDMethod(DistillationMethod):
    """KD against a (possibly synthetic) teacher distribution: subclasses define
    :meth:`teacher_distribution`; the loss is :func:`kd_loss`'s.

    Hot path: a built-in method may also define ``_fast_target`` -- the *same* distribution as
    a :class:`_Target` (e.g. top-k probabilities + tail fill, no ``[B, C]`` scatter or log in
    the forward pass). It is used only while ``teacher_distribution`` is the one defined next to
    it: a subclass that overrides ``teacher_distribution`` alone gets exactly its own target.
    ``_fast_target`` is a per-row function of the stored row (and its label), so such a method
    also has loss-ready rows (:meth:`prepare_rows`): the target in :func:`_loss_ready` form,
    computed once for a preloaded store.
    """

    _use_fast_target: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

        def owner(attr: str) -> type | None:
            return next((c for c in cls.__mro__ if attr in c.__dict__), None)

        fast, dist = owner("_fast_target"), owner("teacher_distribution")
        cls._use_fast_target = fast is not None and dist is not None and issubclass(fast, dist)

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

    def teacher_distribution(
        self, labels: torch.Tensor | None, targets: Mapping[str, torch.Tensor], num_classes: int
    ) -> torch.Tensor:
        """Teacher distribution at ``self.temperature``, ``[B, C]`` float32, rows sum to 1."""
        raise NotImplementedError

    @property
    def prepared_prefix(self) -> str | None:  # type: ignore[override]
        """``"prepared/<name>,<target hyperparameters>,num_classes=C/"``: prepared rows are
        only ever read by a method that would build the same target."""
        if not self._use_fast_target:
            return None
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
            target = self._fast_target(None if labels is None else labels[start:stop], chunk, num_classes)
            if target.index is None and not dense:
                return None  # a dense-by-nature target over the budget: built per batch instead
            part = _loss_ready(target, num_classes, dense).fields(prefix)
            if not out:
                out = {k: v.new_empty((rows, *v.shape[1:])) for k, v in part.items()}
            for k, v in part.items():
                out[k][start:stop] = v
        return out

    def compute(self, student_logits, labels, targets, *, student_features, stage) -> LossOutput:
        return self._kd_output(student_logits, labels, targets, self._labels_nonnegative)

    def _kd_output(self, student_logits, labels, targets, all_labelled: bool | None) -> LossOutput:
        num_classes = student_logits.shape[-1]
        prefix = self.prepared_prefix
        if prefix is not None and prefix + "probs" in targets:
            target = _Target.from_fields(targets, prefix)
            width = (target.probs if target.index is None else target.index).shape[-1]
            if width > num_classes or (target.index is None and width != num_classes):
                raise InvalidTargetsError(
                    f"prepared targets have {width} classes per row, the student {num_classes}"
                )
        elif self._use_fast_target:
            target = self._fast_target(labels, targets, num_classes)
        else:
            probs = self.teacher_distribution(labels, targets, num_classes)
            if probs.requires_grad:  # a learnable target: keep the plain graph so it gets gradients
                return kd_loss(student_logits, probs, labels, temperature=self.temperature,
                               ce_weight=self.ce_weight, kd_weight=self.kd_weight)
            _check_probs(student_logits, probs)
            target = _Target(probs=probs)
        if all_labelled is None and labels is not None:
            all_labelled = _nonnegative_if_cheap(labels)
        return _fused_kd(student_logits, labels, target, self.temperature, self.ce_weight, self.kd_weight, all_labelled)


def _stored_topk_fields(
    targets: Mapping[str, torch.Tensor], num_classes: int, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = targets[TOPK_VALUES], targets[TOPK_INDICES]
    stored_k = values.shape[-1]
    if k is not None:
        if k > stored_k:
            raise InvalidTargetsError(
                f"k={k} but the store only holds the top-{stored_k} logits; use k <= {stored_k} or re-dump with --k {k}"
            )
        values, indices = values[..., :k], indices[..., :k]
    if values.shape[-1] > num_classes:
        raise InvalidTargetsError(f"store has k={values.shape[-1]} > {num_classes} student classes")
    return values, indices


def _stored_topk(
    targets: Mapping[str, torch.Tensor], temperature: float, num_classes: int, k: int | None = None
) -> torch.Tensor:
    values, indices = _stored_topk_fields(targets, num_classes, k)
    return topk_distribution(values, indices, targets[LOGSUMEXP], temperature, num_classes)


def _topk_target(
    targets: Mapping[str, torch.Tensor], temperature: float, num_classes: int, k: int | None = None
) -> _Target:
    """:func:`softlabels.targets.topk_distribution` with its log, for :class:`_FusedKD`.

    k == C: ``topk_distribution`` is ``exp(z / T - lse_T)`` renormalised over the row, i.e.
    ``softmax(z / T)`` whatever ``lse_T`` holds: computed densely in class order (one scatter of
    the values, one ``log_softmax``; the same distribution up to float32 rounding, tested).
    k < C: sparse -- the very operations of ``topk_distribution`` on the ``[B, k]`` probabilities
    and the tail fill (scattering them gives its tensor bit for bit, tested), the logs in closed
    form ``z / T - lse_T - log(normaliser)`` instead of ``log`` of a dense ``[B, C]`` tensor."""
    values, indices = _stored_topk_fields(targets, num_classes, k)
    k = values.shape[-1]
    if k >= num_classes:
        # A class missing from a malformed row (repeated indices) gets logit -inf: probability 0.
        v = values.float()
        dense = v.new_full((v.shape[0], num_classes), -math.inf).scatter_(-1, indices.long(), v)
        log_probs = torch.log_softmax(dense / temperature if temperature != 1.0 else dense, dim=-1)
        return _Target(log_probs.exp(), log_probs, normalised=True)
    log_probs = topk_log_probs(values, targets[LOGSUMEXP], temperature)
    probs = log_probs.exp()
    total = probs.sum(-1, keepdim=True)
    norm = total.clamp(min=1.0)  # fp16 rounding can push the top-k sum past 1
    fill = (1.0 - total).clamp(min=0.0) / (num_classes - k)
    return _Target(probs / norm, log_probs - norm.log(), indices.long(), fill, fill.log(), normalised=True)


@register_method("kd")
class KDMethod(_KDMethod):
    """Hinton KD from everything the store holds. With k == C the target is the exact teacher
    softmax at T. With k < C the full softmax is not recoverable: the target is the exact
    top-k plus the exact tail mass spread uniformly, i.e. *identical to* ``kd-topk`` with the
    stored k (a one-time warning says so) -- we do not raise, because that is the best
    approximation the store allows and the store's k is recorded with the run."""

    needs = _TOPK_FIELDS

    def __init__(self, *, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=None) -> None:
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)
        self._warned = False

    def teacher_distribution(self, labels, targets, num_classes):
        self._warn_partial(targets, num_classes, stacklevel=3)
        return _stored_topk(targets, self.temperature, num_classes)

    def _fast_target(self, labels, targets, num_classes):
        self._warn_partial(targets, num_classes, stacklevel=8)  # the frame that called the method
        return _topk_target(targets, self.temperature, num_classes)

    def _warn_partial(self, targets, num_classes, stacklevel):
        k = targets[TOPK_VALUES].shape[-1]
        if k < num_classes and not self._warned:
            self._warned = True
            warnings.warn(
                f"store has top-{k} of {num_classes} classes: 'kd' uses the exact top-{k} probabilities plus a "
                f"uniform tail (same as 'kd-topk' with k={k}); dump with --k {num_classes} for exact KD",
                stacklevel=stacklevel,
            )


@register_method("kd-topk")
class KDTopKMethod(_KDMethod):
    """KD-topk (Tang et al. 2020): exact top-k teacher probabilities at T, remaining mass
    uniform over the other C - k classes. ``k`` uses the first k of the stored top-k
    (k <= stored k); ``k=None`` uses all stored (then equal to ``kd``)."""

    needs = _TOPK_FIELDS

    def __init__(self, *, k: int | None = None, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=None):
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)
        if k is not None and int(k) < 1:
            raise SpecError(f"k must be >= 1, got {k}")
        if k is not None and self.num_classes is not None and int(k) > self.num_classes:
            raise SpecError(f"k={k} exceeds num_classes={self.num_classes}")
        self.k = None if k is None else int(k)
        self.hparams = {"k": self.k, **self.hparams}

    def teacher_distribution(self, labels, targets, num_classes):
        return _stored_topk(targets, self.temperature, num_classes, self.k)

    def _fast_target(self, labels, targets, num_classes):
        return _topk_target(targets, self.temperature, num_classes, self.k)


@register_method("kd-pt")
class KDGroundTruthMethod(_KDMethod):
    """KD-pt (Tang et al. 2020): only the teacher's probability on the true class,
    ``p_t[y] = exp(z_y / T - lse_T)``, and ``1 - p_t[y]`` uniform over the other classes."""

    requires_labels = True
    needs = _PT_FIELDS

    def teacher_distribution(self, labels, targets, num_classes):
        return ground_truth_distribution(
            targets[LABEL_LOGIT], targets[LOGSUMEXP], labels, self.temperature, num_classes
        )

    def _fast_target(self, labels, targets, num_classes):
        # ground_truth_distribution in sparse form (k = 1 at the label, same operations).
        log_p_y = targets[LABEL_LOGIT].float() / float(self.temperature) - targets[LOGSUMEXP].float()
        p_y = log_p_y.exp().clamp(max=1.0)
        fill = ((1.0 - p_y) / max(num_classes - 1, 1)).unsqueeze(-1)
        return _Target(p_y.unsqueeze(-1), log_p_y.clamp(max=0.0).unsqueeze(-1), labels.long().unsqueeze(-1),
                       fill, fill.log(), normalised=True)


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
    def __init__(self, *, classifier_weight, rho, temperature, ce_weight, kd_weight, num_classes):
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

    def __init__(self, *, rho=1.0, temperature=4.0, ce_weight=0.1, kd_weight=0.9, classifier_weight=None,
                 num_classes=None) -> None:
        super().__init__(classifier_weight=classifier_weight, rho=rho, temperature=temperature,
                         ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)

    def teacher_distribution(self, labels, targets, num_classes):
        return self._sim(labels)

    def _fast_target(self, labels, targets, num_classes):
        if self.sim_table.shape[-1] != num_classes:
            raise InvalidTargetsError(
                f"the similarity table has {self.sim_table.shape[-1]} classes, the student {num_classes}"
            )
        y = labels.long().to(self.sim_table.device)
        return _Target(self.sim_table[y], self.sim_log_table[y], normalised=True)


@register_method("kd-pt+sim")
class KDGroundTruthSimilarityMethod(_SimMethod):
    """KD-pt+sim (Tang et al. 2020): the average ``(KD-pt + KD-sim) / 2`` of the two synthetic
    targets -- instance-level confidence plus class geometry."""

    requires_labels = True
    needs = _PT_FIELDS

    def __init__(self, *, rho=1.0, temperature=4.0, ce_weight=0.1, kd_weight=0.9, classifier_weight=None,
                 num_classes=None) -> None:
        super().__init__(classifier_weight=classifier_weight, rho=rho, temperature=temperature,
                         ce_weight=ce_weight, kd_weight=kd_weight, num_classes=num_classes)

    def teacher_distribution(self, labels, targets, num_classes):
        pt = ground_truth_distribution(targets[LABEL_LOGIT], targets[LOGSUMEXP], labels, self.temperature, num_classes)
        return 0.5 * (pt + self._sim(labels).to(pt.device))

    def _fast_target(self, labels, targets, num_classes):
        # dense: the average of two distributions is one (its log is taken in the forward)
        return _Target(self.teacher_distribution(labels, targets, num_classes), normalised=True)


# -- hints -----------------------------------------------------------------------------
@register_method("hint")
class HintMethod(DistillationMethod):
    """FitNets hints: a :class:`HintRegressor` maps the student's hint layer
    (``student_features``) to the stored teacher feature ``features/<feature>``; MSE loss.

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

    def __init__(
        self,
        *,
        mode: str = "joint",
        hint_weight: float = 100.0,
        ce_weight: float | None = None,
        kd_weight: float | None = None,
        temperature: float = 4.0,
        hint_epochs: int | None = None,
        feature: str = "penultimate",
        student_feature_shape: int | Sequence[int] | None = None,
        teacher_feature_shape: int | Sequence[int] | None = None,
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
        self.stages = ("hint", "kd") if two else ("main",)
        kd_fields = _TOPK_FIELDS if self.kd_weight > 0 else frozenset()
        self.needs = frozenset({self.feature_key}) | kd_fields
        self.hparams = {
            "mode": mode,
            "hint_weight": self.hint_weight,
            "ce_weight": self.ce_weight,
            "kd_weight": self.kd_weight,
            "temperature": self.temperature,
            "hint_epochs": self.hint_epochs,
            "feature": self.feature_key,
        }
        self._kd = KDMethod(temperature=self.temperature, ce_weight=self.ce_weight, kd_weight=self.kd_weight)

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
            hint = hint_loss(self.regressor(student_features), teacher)
            total = total + self.hint_weight * hint
            components["hint"] = hint.detach()
        if stage in (None, "main", "kd"):
            if self.kd_weight > 0:
                kd = self._kd._kd_output(student_logits, labels, targets, self._labels_nonnegative)
                total = total + kd.total
                components.update(kd.components)
            elif labels is not None:
                ce = _cross_entropy(_upcast(student_logits), labels.long(), self._labels_nonnegative)
                total = total + self.ce_weight * ce
                components["ce"] = ce.detach()
        return LossOutput(total, components)
