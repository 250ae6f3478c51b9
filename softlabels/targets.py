"""Target maths: from teacher logits to stored fields, and from stored fields back to
the exact teacher distribution each distillation method needs.

A store keeps, per (sample, view), the k largest teacher logits ``z`` (sorted descending,
at T=1; *normalised*: shifted per row so that ``logsumexp(z) = 0``, i.e. they are the T=1
log-probabilities -- softmax is shift-invariant, so they are the logits for every softmax-based
method, and float16 rounding error then scales with ``|log p|``, smallest for the classes that
matter), their class indices, ``logsumexp(z / T)`` for each temperature of the store's grid
and the ground-truth logit ``z[y]``. With the stored normaliser, ``exp(z_i / T - lse_T)`` is
the *exact* teacher probability of class i at T -- no renormalisation over the top-k, so the
tail mass ``1 - sum(top-k)`` is exact too (up to the storage dtype of the values).

All functions are pure torch, upcast to float32, and shape-polymorphic over leading dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from softlabels.errors import InvalidTargetsError
from softlabels.fields import LABEL_LOGIT, LOGSUMEXP, TOPK_INDICES, TOPK_VALUES, check_k_range

__all__ = [
    "TeacherTarget",
    "stored_topk_fields",
    "check_k",
    "summarize_logits",
    "temperature_index",
    "topk_log_probs",
    "tail_mass",
    "topk_distribution",
    "ground_truth_distribution",
    "similarity_distribution",
    "uniform_label_smoothing",
]


def summarize_logits(
    logits: torch.Tensor,
    k: int,
    temperatures: Sequence[float],
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reduce dense teacher logits ``[..., C]`` to the stored fields.

    All returned logits are normalised (shifted so that ``logsumexp(z) = 0`` per row).
    Returns float32/int64 tensors (the writer casts to storage dtypes):
    ``topk_values [..., k]``, ``topk_indices [..., k]``, ``logsumexp [..., len(T)]`` and,
    when ``labels [...]`` is given, ``label_logit [...]``.
    Raises :class:`InvalidTargetsError` for k > C or non-finite logits.
    """
    z = logits.detach().float()
    num_classes = z.shape[-1]
    check_k_range(k, num_classes)
    # A finite sum means every logit is finite (a NaN or inf term makes any sum non-finite); it
    # costs a tenth of isfinite(z).all(), which then only runs when the sum is not finite.
    if not torch.isfinite(z.sum()) and not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).any(dim=-1).sum())
        raise InvalidTargetsError(
            f"teacher produced NaN/inf logits for {bad} sample(s); check the checkpoint and "
            "the input preprocessing (nothing was recorded for this unit)"
        )
    z = z - torch.logsumexp(z, dim=-1, keepdim=True)
    values, indices = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    # z / 1.0 == z exactly: skip that division (the common T = 1 entry), same bits
    lse = torch.stack([torch.logsumexp(z if float(t) == 1.0 else z / float(t), dim=-1) for t in temperatures], dim=-1)
    out = {TOPK_VALUES: values, TOPK_INDICES: indices, LOGSUMEXP: lse}
    if labels is not None:
        labels = labels.long()
        if labels.shape != z.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != logits batch shape {tuple(z.shape[:-1])}")
        safe = labels.clamp(min=0)
        out[LABEL_LOGIT] = torch.gather(z, -1, safe.unsqueeze(-1)).squeeze(-1)
    return out


def temperature_index(temperatures: Sequence[float], temperature: float) -> int:
    """Position of ``temperature`` in the store's grid; a clear error when it is not stored."""
    for i, t in enumerate(temperatures):
        if abs(float(t) - float(temperature)) <= 1e-6 * max(1.0, abs(float(t))):
            return i
    grid = ",".join(f"{float(t):g}" for t in temperatures)
    raise InvalidTargetsError(
        f"temperature {temperature:g} is not in the store's grid [{grid}]; "
        f"train at one of those or re-dump with --temperatures {grid},{temperature:g}"
    )


def topk_log_probs(values: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact teacher log-probabilities of the stored top-k classes at ``temperature``.

    ``values [..., k]`` are T=1 logits, ``lse [...]`` is ``logsumexp(z / temperature)``.
    """
    return values.float() / float(temperature) - lse.float().unsqueeze(-1)


def tail_mass(values: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probability mass outside the top-k, ``[...]``; clamped at 0 against fp16 rounding."""
    return (1.0 - topk_log_probs(values, lse, temperature).exp().sum(-1)).clamp(min=0.0)


class TeacherTarget:
    """A teacher distribution at T, ``[B, C]``, in the form that is cheapest to use.

    *Sparse* (``index`` given): ``probs``/``log_probs [B, k]`` at the classes ``index [B, k]``
    (int64) and, when ``k < C``, ``fill [B, 1]`` -- the probability of *each* of the other
    ``C - k`` classes -- with ``log_fill``. Top-k and KD-pt targets come in this form, so neither
    a dense ``[B, C]`` target nor its log is built in the loss. *Dense* (``index`` None):
    ``probs [B, C]``, ``log_probs`` optional (then computed by the loss); only a dense target a
    method builds itself may require grad (a learnable target).

    Built by :meth:`topk` / :meth:`ground_truth` (the maths of the KD targets, once);
    :meth:`dense` gives the ``[B, C]`` reference, :meth:`loss_ready` the form that
    :meth:`~softlabels.losses.DistillationMethod.prepare_rows` delivers.
    """

    __slots__ = ("probs", "log_probs", "index", "fill", "log_fill")

    def __init__(self, probs, log_probs=None, index=None, fill=None, log_fill=None) -> None:
        self.probs, self.log_probs, self.index = probs, log_probs, index
        self.fill, self.log_fill = fill, log_fill

    @classmethod
    def topk(cls, values, indices, lse, temperature: float, num_classes: int) -> TeacherTarget:
        """KD-topk (Tang et al. 2020): exact top-k probabilities at T, the remaining mass spread
        uniformly over the other ``C - k`` classes. With k == C this is the full teacher softmax,
        built densely in class order (a class missing from a malformed row gets probability 0);
        k < C: sparse, with the logs in closed form ``z / T - lse_T - log(normaliser)``."""
        k = values.shape[-1]
        if k >= num_classes:
            v = values.float()
            dense = v.new_full((*v.shape[:-1], num_classes), -math.inf).scatter_(-1, indices.long(), v)
            log_probs = torch.log_softmax(dense / temperature if temperature != 1.0 else dense, dim=-1)
            return cls(log_probs.exp(), log_probs)
        log_probs = topk_log_probs(values, lse, temperature)
        probs = log_probs.exp()
        total = probs.sum(-1, keepdim=True)
        norm = total.clamp(min=1.0)  # fp16 rounding can push the top-k sum past 1
        fill = (1.0 - total).clamp(min=0.0) / (num_classes - k)
        return cls(probs / norm, log_probs - norm.log(), indices.long(), fill, fill.log())

    @classmethod
    def ground_truth(cls, label_logit, lse, labels, temperature: float, num_classes: int) -> TeacherTarget:
        """KD-pt: the teacher's probability on the true class, ``p_t[y]``, and ``1 - p_t[y]``
        spread uniformly over the other ``C - 1`` classes (sparse, k = 1 at the label)."""
        log_p_y = label_logit.float() / float(temperature) - lse.float()
        p_y = log_p_y.exp().clamp(max=1.0)
        fill = ((1.0 - p_y) / max(num_classes - 1, 1)).unsqueeze(-1)
        return cls(p_y.unsqueeze(-1), log_p_y.clamp(max=0.0).unsqueeze(-1), labels.long().unsqueeze(-1),
                   fill, fill.log())

    def dense(self, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[B, C]`` distribution (one scatter for the sparse form)."""
        return _scatter_rows(self.probs, self.index, self.fill, num_classes, dtype)

    def loss_ready(self, num_classes: int, dense: bool) -> TeacherTarget:
        """This target as :meth:`~softlabels.losses.DistillationMethod.prepare_rows` delivers it:
        float32 (float64 stays), contiguous, ``log_probs`` present with 0 where the probability is
        0 (a ``0 * -inf`` term would make the loss fall back to its masked sum), scattered to
        ``[B, C]`` when ``dense`` (then the loss needs no gather and its gradient no scatter)."""
        dtype = torch.float64 if self.probs.dtype == torch.float64 else torch.float32
        p = _as(self.probs, dtype).contiguous()
        logp = torch.log(p) if self.log_probs is None else _as(self.log_probs, dtype)
        logp = torch.where(p > 0, logp, 0.0).contiguous()
        fill = log_fill = None
        if self.fill is not None:
            fill = _as(self.fill, dtype).contiguous()
            log_fill = torch.log(fill) if self.log_fill is None else _as(self.log_fill, dtype)
            log_fill = torch.where(fill > 0, log_fill, 0.0).contiguous()
        index = None if self.index is None else self.index.long().contiguous()
        if dense and index is not None:
            p = _scatter_rows(p, index, fill, num_classes, dtype)
            logp = _scatter_rows(logp, index, log_fill, num_classes, dtype)
            index = fill = log_fill = None
        return TeacherTarget(p, logp, index, fill, log_fill)

    def fields(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors as prepared fields ``prefix + probs|log_probs|index|fill|log_fill``."""
        names = ("probs", "log_probs", "index", "fill", "log_fill")
        return {prefix + n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_fields(cls, targets: Mapping[str, torch.Tensor], prefix: str) -> TeacherTarget:
        """The inverse of :meth:`fields`."""
        get = targets.get
        return cls(targets[prefix + "probs"], targets[prefix + "log_probs"], get(prefix + "index"),
                   get(prefix + "fill"), get(prefix + "log_fill"))


def _scatter_rows(values, index, fill, num_classes, dtype) -> torch.Tensor:
    """``[..., C]`` rows: ``fill`` (or 0) everywhere, ``values`` at ``index``; ``values`` itself
    when ``index`` is None."""
    values = _as(values, dtype)
    if index is None:
        return values
    if fill is None:
        out = values.new_zeros(*values.shape[:-1], num_classes)
    else:
        out = _as(fill, dtype).expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, index, values)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def stored_topk_fields(
    targets: Mapping[str, torch.Tensor], num_classes: int, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored top-k ``(values, indices)`` of a batch, cut to the first ``k``: the one check
    that ``k`` is at most the stored k and the stored k at most the student's classes."""
    values, indices = targets[TOPK_VALUES], targets[TOPK_INDICES]
    check_k(k, values.shape[-1])
    if k is not None:
        values, indices = values[..., :k], indices[..., :k]
    if values.shape[-1] > num_classes:
        raise InvalidTargetsError(f"store has k={values.shape[-1]} > {num_classes} student classes")
    return values, indices


def check_k(k: int | None, stored_k: int, where: str = "the store") -> None:
    """Refuse a ``k`` larger than the ``stored_k`` logits ``where`` holds."""
    if k is not None and k > stored_k:
        raise InvalidTargetsError(
            f"k={k} but {where} only holds the top-{stored_k} logits; use {'k' if where == 'the store' else '--k'} <= "
            f"{stored_k} or re-dump with --k {k}"
        )


def topk_distribution(
    values: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """KD-topk target ``[..., C]``, float32, rows sum to 1 (:meth:`TeacherTarget.topk`, dense).
    With k == C this *is* the full teacher softmax."""
    return TeacherTarget.topk(values, indices, lse, temperature, num_classes).dense(num_classes)


def ground_truth_distribution(
    label_logit: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """KD-pt target ``[..., C]`` (:meth:`TeacherTarget.ground_truth`, dense)."""
    return TeacherTarget.ground_truth(label_logit, lse, labels, temperature, num_classes).dense(num_classes)


def similarity_distribution(
    classifier_weight: torch.Tensor,
    labels: torch.Tensor,
    rho: float,
    temperature: float,
) -> torch.Tensor:
    """KD-sim target: ``softmax(cos(W_y, W_j)^rho / T)`` over classes j, from the teacher's
    classifier weight ``[C, D]`` (rows L2-normalised here). The power is sign-preserving
    (``sign(c) * |c|^rho``) so that negative cosines stay negative for any real rho."""
    w = torch.nn.functional.normalize(classifier_weight.float(), dim=-1)
    cos = (w @ w.T).clamp(-1.0, 1.0)
    sharpened = cos.sign() * cos.abs().pow(float(rho))
    return torch.softmax(sharpened[labels.long()] / float(temperature), dim=-1)


def uniform_label_smoothing(labels: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """LS target ``(1 - eps) * onehot + eps / C``: KD with a uniform teacher. ``[..., C]``."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    return (1.0 - epsilon) * onehot + epsilon / num_classes
