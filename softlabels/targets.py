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

from collections.abc import Sequence

import torch

from softlabels.errors import InvalidTargetsError

__all__ = [
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
    if not 1 <= k <= num_classes:
        raise InvalidTargetsError(
            f"k={k} is outside 1..{num_classes} (the teacher has {num_classes} classes); "
            f"pass --k between 1 and {num_classes}"
        )
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
    out = {"topk_values": values, "topk_indices": indices, "logsumexp": lse}
    if labels is not None:
        labels = labels.long()
        if labels.shape != z.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != logits batch shape {tuple(z.shape[:-1])}")
        safe = labels.clamp(min=0)
        out["label_logit"] = torch.gather(z, -1, safe.unsqueeze(-1)).squeeze(-1)
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


def topk_distribution(
    values: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """KD-topk target (Tang et al. 2020): exact top-k probabilities, the remaining mass spread
    uniformly over the other ``C - k`` classes. ``[..., C]``, float32, rows sum to 1.

    With k == C this *is* the full teacher softmax.
    """
    k = values.shape[-1]
    if k >= num_classes:
        # every class is stored: the full softmax, in one scatter + softmax (self-normalising,
        # so fp16 rounding of the values cannot push the row sum off 1)
        v = values.float()
        dense = v.new_full((*v.shape[:-1], num_classes), float("-inf")).scatter_(-1, indices.long(), v)
        return torch.softmax(dense / float(temperature), dim=-1)
    probs = topk_log_probs(values, lse, temperature).exp()
    total = probs.sum(-1, keepdim=True)
    probs = probs / total.clamp(min=1.0)  # fp16 rounding can push the top-k sum past 1
    fill = (1.0 - total).clamp(min=0.0) / (num_classes - k)
    dense = fill.expand(*probs.shape[:-1], num_classes).clone()
    dense.scatter_(-1, indices.long(), probs)
    return dense


def ground_truth_distribution(
    label_logit: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """KD-pt target: the teacher's probability on the true class, ``p_t[y]``, and
    ``1 - p_t[y]`` spread uniformly over the other ``C - 1`` classes. ``[..., C]``."""
    p_y = (label_logit.float() / float(temperature) - lse.float()).exp().clamp(max=1.0)
    rest = ((1.0 - p_y) / max(num_classes - 1, 1)).unsqueeze(-1)
    dense = rest.expand(*p_y.shape, num_classes).clone()
    dense.scatter_(-1, labels.long().unsqueeze(-1), p_y.unsqueeze(-1))
    return dense


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
