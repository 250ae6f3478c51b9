"""Semantic checks: stored values that decode fine but cannot be what a teacher said.

Checksums and unit digests prove that bytes are the bytes that were written; they say nothing
about whether those bytes make sense. A store crafted (or written by a buggy tool) with class
indices outside ``0..C-1``, repeated classes in a row, NaN or positive log-probabilities, or
infinite normalisers trains to garbage, or crashes deep inside a loss. These checks run on each
unit as ``verify`` reads it and before ``train`` uses a store (docs/FORMAT.md §6, item 5).

Every check is vectorised over one unit and counts offending *rows* (samples), so a report reads
``topk_indices: 12 row(s) with a class index outside 0..9``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from softlabels.stores import format as fmt

# Values are normalised logits ẑ = z - logsumexp(z) <= 0, computed in float32 and rounded to the
# storage dtype; a positive value larger than this is not rounding, it is not a log-probability.
# Comparisons with the normaliser allow the same, relative to the value (float16 keeps ~3 digits).
LOGPROB_TOLERANCE = 1e-3


def _rows(bad: np.ndarray) -> np.ndarray:
    """Boolean [n] of rows (axis 0) where any element of ``bad`` is set."""
    return bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim > 1 else bad


def unit_violations(schema: fmt.StoreSchema, arrays: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """``[(description, bad_rows)]`` for one unit's arrays (any subset of the per-sample arrays,
    each ``[n, ...]``; cross-array checks run when both arrays are given)."""
    out: list[tuple[str, np.ndarray]] = []
    c = schema.num_classes

    def add(description: str, bad: np.ndarray) -> None:
        rows = _rows(bad)
        if rows.any():
            out.append((description, rows))

    indices = arrays.get(fmt.TOPK_INDICES)
    if indices is not None:
        idx = indices.astype(np.int64)
        add(f"{fmt.TOPK_INDICES}: row(s) with a class index outside 0..{c - 1}", (idx < 0) | (idx >= c))
        ordered = np.sort(idx, axis=-1)
        add(f"{fmt.TOPK_INDICES}: row(s) with a class repeated within the top-k", (ordered[..., 1:] == ordered[..., :-1]))
    values = arrays.get(fmt.TOPK_VALUES)
    finite_values = None
    if values is not None:
        v = values.astype(np.float32)
        finite = np.isfinite(v)
        finite_values = np.where(finite, v, 0.0)
        add(f"{fmt.TOPK_VALUES}: row(s) with NaN/inf values", ~finite)
        add(f"{fmt.TOPK_VALUES}: row(s) with log-probabilities > 0", finite_values > LOGPROB_TOLERANCE)
        add(f"{fmt.TOPK_VALUES}: row(s) not sorted in descending order", np.diff(finite_values, axis=-1) > 0)
    lse = arrays.get(fmt.LOGSUMEXP)
    finite_lse = None
    if lse is not None:
        finite = np.isfinite(lse)
        finite_lse = np.where(finite, lse, 0.0).astype(np.float64)
        add(f"{fmt.LOGSUMEXP}: row(s) with NaN/inf normalisers", ~finite)
    temps = np.asarray(schema.temperatures, dtype=np.float64)
    if finite_values is not None and finite_lse is not None:
        top = finite_values[..., :1].astype(np.float64)  # [n, V, 1]: the row's largest log-probability
        add(f"{fmt.LOGSUMEXP}: row(s) whose normaliser is below the top value (probability > 1)",
            top / temps > finite_lse + LOGPROB_TOLERANCE * (1 + np.abs(top)))
    label_logit = arrays.get(fmt.LABEL_LOGIT)
    if label_logit is not None:
        ll = label_logit.astype(np.float32)
        finite = np.isfinite(ll)
        add(f"{fmt.LABEL_LOGIT}: row(s) with NaN/inf values", ~finite)
        ll = np.where(finite, ll, 0.0).astype(np.float64)
        add(f"{fmt.LABEL_LOGIT}: row(s) with log-probabilities > 0", ll > LOGPROB_TOLERANCE)
        if finite_lse is not None:
            add(f"{fmt.LABEL_LOGIT}: row(s) above the row's normaliser (probability > 1)",
                ll[..., None] / temps > finite_lse + LOGPROB_TOLERANCE * (1 + np.abs(ll[..., None])))
    labels = arrays.get(fmt.LABELS)
    if labels is not None:
        lab = labels.astype(np.int64)
        add(f"{fmt.LABELS}: row(s) with a label outside 0..{c - 1}", (lab < 0) | (lab >= c))
    for name, data in arrays.items():
        if name.startswith(fmt.FEATURES_PREFIX):
            add(f"{name}: row(s) with NaN/inf features", ~np.isfinite(data))
    return out


@dataclass
class SemanticReport:
    """Violations over a whole store: ``{description: [rows, first_unit]}``, in finding order."""

    found: dict[str, list[int]] = field(default_factory=dict)

    def add(self, unit: int, violations: list[tuple[str, np.ndarray]]) -> None:
        for description, rows in violations:
            entry = self.found.setdefault(description, [0, unit])
            entry[0] += int(rows.sum())

    def problems(self, schema: fmt.StoreSchema) -> list[str]:
        """One line per violation: ``targets topk_values: 7 row(s) with NaN/inf values (first in unit 3,
        rows 768..1023)``."""
        out = []
        for description, (count, unit) in self.found.items():
            start, stop = schema.unit_range(unit)
            name, _, what = description.partition(": ")
            out.append(f"targets {name}: {count} {what} (first in unit {unit}, rows {start}..{stop - 1})")
        return out
