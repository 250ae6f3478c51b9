"""The compact target codec (format 1.2): top-k targets in ~1 byte per stored number.

What the fp16 codec stores as ``topk_values`` / ``topk_indices`` / ``logsumexp`` /
``label_logit`` this codec stores as four plain uint8/uint16 Zarr arrays (docs/FORMAT.md §8):

- ``compact/indices [N, V, k]`` uint8 (C <= 256) or uint16: the top-k classes in value order
  (coding views > 0 relative to view 0 was measured and cost more: BENCHMARKS.md);
- ``compact/logp_gaps [N, V, k]`` uint16: ``q_r - q_{r-1}`` (``q_{-1} = 0``) with
  ``q_r = round((v_0 - v_r) / logp_step)``, the rank-r log-probability below the row's top-1 in
  steps of ``logp_step`` nats; ``q_0 = 0``, so column 0 is always 0 (uint16, not uint8: a
  confident teacher's ranks sit 30-100 nats apart, which matters at T = 8; the high bytes are
  nearly all 0 and cost nothing after bitshuffle);
- ``compact/tail [N, V, len(tail_temperatures)]`` uint8: the teacher's probability mass outside
  the top-k at each temperature, as log-odds: ``min(255, max(0, round(logit(m_T) /
  tail_step) + 128))`` (absent when k = C: the tail is empty);
- ``compact/label_gap [N, V]`` uint16: ``min(65535, round((v_0 - label_logit) / logp_step))``.

Decoding (exact formula, :func:`decode`) gives back the fields the losses read, normalised as
in the fp16 codec: every decoded row is a distribution whose top-k mass at each stored T is
exactly ``1 - m_T`` of the decoded tail mass. Pure numpy; no torch, no zarr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from softlabels.errors import InvalidTargetsError

NAME = "compact"
VERSION = 1
PREFIX = "compact/"
INDICES = PREFIX + "indices"
LOGP_GAPS = PREFIX + "logp_gaps"
TAIL = PREFIX + "tail"
LABEL_GAP = PREFIX + "label_gap"

# Logical fields (what readers and losses see), spelled as in softlabels.stores.format.
TOPK_VALUES, TOPK_INDICES, LOGSUMEXP, LABEL_LOGIT = "topk_values", "topk_indices", "logsumexp", "label_logit"
FIELDS = (TOPK_VALUES, TOPK_INDICES, LOGSUMEXP, LABEL_LOGIT)

# Chosen by benchmarks/compact_codec.py (BENCHMARKS.md "Compact codec").
DEFAULT_LOGP_STEP = 0.125
DEFAULT_TAIL_STEP = 0.125
TAIL_OFFSET = 128
MAX_GAP = 65_535  # uint16 gaps: 8,191 nats at logp_step 0.125
_TABLE = 4096
_BLOCK = 8192  # rows decoded at a time
MAX_CLASSES = 65_536

_NEEDS = {
    TOPK_VALUES: (LOGP_GAPS, TAIL),
    TOPK_INDICES: (INDICES,),
    LOGSUMEXP: (LOGP_GAPS, TAIL),
    LABEL_LOGIT: (LOGP_GAPS, TAIL, LABEL_GAP),
}


@dataclass(frozen=True)
class CompactCodec:
    """Parameters of the compact codec, recorded as JSON under ``schema.codec``."""

    num_classes: int
    k: int
    temperatures: tuple[float, ...]
    logp_step: float = DEFAULT_LOGP_STEP
    tail_step: float = DEFAULT_TAIL_STEP

    def __post_init__(self) -> None:
        if self.num_classes > MAX_CLASSES:
            raise InvalidTargetsError(
                f"the compact codec stores class ids as uint16 and supports up to {MAX_CLASSES:,} classes, the teacher "
                f"has {self.num_classes:,}; dump with --codec fp16"
            )
        for name in ("logp_step", "tail_step"):
            if not float(getattr(self, name)) > 0:
                raise InvalidTargetsError(f"compact codec {name} must be > 0, got {getattr(self, name)}")
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))

    # -- layout -------------------------------------------------------------------
    @property
    def index_dtype(self) -> str:
        return "uint8" if self.num_classes <= 256 else "uint16"

    @property
    def has_tail(self) -> bool:
        return self.k < self.num_classes

    @property
    def tail_temperatures(self) -> tuple[float, ...]:
        """Columns of ``compact/tail``: the store's temperatures, with T = 1 first when the grid
        lacks it (the T = 1 mass fixes the decoded values' normalisation)."""
        return self.temperatures if 1.0 in self.temperatures else (1.0, *self.temperatures)

    def arrays(self, labeled: bool) -> list[tuple[str, tuple[str, ...], tuple[int, ...], str]]:
        """``(name, dimension_names, per-view shape, dtype)`` of each stored array, in canonical order."""
        out = [
            (INDICES, ("sample", "view", "rank"), (self.k,), self.index_dtype),
            (LOGP_GAPS, ("sample", "view", "rank"), (self.k,), "uint16"),
        ]
        if self.has_tail:
            out.append((TAIL, ("sample", "view", "temperature"), (len(self.tail_temperatures),), "uint8"))
        if labeled:
            out.append((LABEL_GAP, ("sample", "view"), (), "uint16"))
        return out

    def needs(self, fields: Sequence[str]) -> list[str]:
        """Stored arrays that decoding ``fields`` reads."""
        names: list[str] = []
        for f in fields:
            for a in _NEEDS[f]:
                if a not in names and (a != TAIL or self.has_tail):
                    names.append(a)
        return names

    # -- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": NAME, "version": VERSION, "logp_step": self.logp_step, "tail_step": self.tail_step,
            "tail_offset": TAIL_OFFSET, "tail_temperatures": list(self.tail_temperatures),
            "index_dtype": self.index_dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, num_classes: int, k: int, temperatures: Sequence[float]) -> CompactCodec:
        if d.get("name") != NAME or int(d.get("version", 0)) != VERSION:
            raise InvalidTargetsError(
                f"unknown target codec {d.get('name')!r} version {d.get('version')!r}; upgrade softlabels"
            )
        return cls(num_classes, k, tuple(temperatures), float(d["logp_step"]), float(d["tail_step"]))

    # -- encode / decode ----------------------------------------------------------
    def encode(self, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logical fields ``[n, V, ...]`` (normalised T = 1 log-probabilities, as
        :func:`softlabels.targets.summarize_logits` returns them) -> stored arrays."""
        v = np.asarray(fields[TOPK_VALUES], dtype=np.float64)
        idx = np.asarray(fields[TOPK_INDICES]).astype(np.int64)
        lse = np.asarray(fields[LOGSUMEXP], dtype=np.float64)
        top = v[..., :1]
        q = _quantise(top - v, self.logp_step, MAX_GAP * self.k)
        q = np.where((v < top) & (q == 0), 1, q)  # keep the top-1 strictly on top: top-1 agreement is exact
        q = np.maximum.accumulate(q, axis=-1)  # descending values: already monotone, made sure
        gaps = np.minimum(np.diff(q, axis=-1, prepend=0), MAX_GAP)  # one gap past 8,191 nats: clipped
        out = {INDICES: idx.astype(self.index_dtype), LOGP_GAPS: gaps.astype(np.uint16)}
        if self.has_tail:
            cols = []
            for t in self.tail_temperatures:
                lse_t = lse[..., self.temperatures.index(t)] if t in self.temperatures else 0.0  # lse at T=1 is 0
                log_mass = _logsumexp(v / t - np.expand_dims(lse_t, -1))  # log of the top-k mass
                with np.errstate(divide="ignore", invalid="ignore"):
                    logit = np.log(-np.expm1(np.minimum(log_mass, 0.0))) - log_mass
                code = np.round(np.nan_to_num(logit, nan=-np.inf) / self.tail_step) + TAIL_OFFSET
                cols.append(np.clip(code, 0, 255))
            out[TAIL] = np.stack(cols, axis=-1).astype(np.uint8)
        if LABEL_LOGIT in fields:
            ll = np.asarray(fields[LABEL_LOGIT], dtype=np.float64)
            out[LABEL_GAP] = _quantise(top[..., 0] - ll, self.logp_step, MAX_GAP).astype(np.uint16)
        return out

    def decode(self, raw: Mapping[str, np.ndarray], fields: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored arrays (``[n, V, ...]``, all views) -> logical ``fields``: ``topk_values``,
        ``label_logit``, ``logsumexp`` float32, ``topk_indices`` uint16. Decoded in blocks of
        8,192 rows: temporaries that stay in cache (a 65,536-row shard decodes ~2x faster so)."""
        n = len(next(iter(raw.values())))
        if n <= _BLOCK:
            return self._decode(raw, fields)
        parts = [self._decode({a: x[i : i + _BLOCK] for a, x in raw.items()}, fields) for i in range(0, n, _BLOCK)]
        return {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}

    def _decode(self, raw: Mapping[str, np.ndarray], fields: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if TOPK_INDICES in fields:
            out[TOPK_INDICES] = raw[INDICES].astype(np.uint16, copy=False)
        if not {TOPK_VALUES, LOGSUMEXP, LABEL_LOGIT} & set(fields):
            return out
        gaps = raw[LOGP_GAPS]
        lead, k = gaps.shape[:-1], gaps.shape[-1]
        # q_r = (v_0 - v_r) / logp_step >= 0 (q_0 = 0), rank-major [k, rows]: the running sum over
        # ranks and the sums below are vector adds over rows (numpy is ~10x slower along a short last axis)
        q = np.ascontiguousarray(gaps.reshape(-1, k).T, dtype=np.intp)
        for r in range(1, k):
            q[r] += q[r - 1]
        codes = raw[TAIL].reshape(-1, len(self.tail_temperatures)) if self.has_tail else None

        def log_keep(t: float) -> np.ndarray | float:  # log(1 - m_T): a lookup by the 8-bit tail code
            return self._log_keep_table()[codes[:, self.tail_temperatures.index(t)]] if codes is not None else 0.0

        sums: dict[float, np.ndarray] = {}  # Σ_r exp(-d_r / T), d = logp_step * q; >= 1 (q_0 = 0): no max shift

        def exp_sum(t: float) -> np.ndarray:
            if t not in sums:
                sums[t] = self._exp(q, t).sum(axis=0)
            return sums[t]

        top = log_keep(1.0) - np.log(exp_sum(1.0))  # v_0: the top-k mass at T = 1 is 1 - m_1
        if TOPK_VALUES in fields:
            d = q * self.logp_step
            out[TOPK_VALUES] = np.subtract(top, d, out=d).T.astype(np.float32).reshape(*lead, k)
        if LOGSUMEXP in fields:
            lse = np.empty((top.size, len(self.temperatures)), dtype=np.float32)
            for j, t in enumerate(self.temperatures):
                lse[:, j] = top / t + np.log(exp_sum(t)) - log_keep(t)
            out[LOGSUMEXP] = lse.reshape(*lead, len(self.temperatures))
        if LABEL_LOGIT in fields:
            label = top.reshape(lead) - raw[LABEL_GAP].astype(np.float64) * self.logp_step
            out[LABEL_LOGIT] = label.astype(np.float32)
        return out

    def _exp(self, q: np.ndarray, t: float) -> np.ndarray:
        """``exp(-logp_step * q / t)`` for rank-major ``q``: a table lookup for the usual q < 4,096
        (the decoder's only transcendental per rank), computed for rows reaching further."""
        tables = self.__dict__.setdefault("_tables", {})  # frozen dataclass: a cache outside the fields
        if t not in tables:
            tables[t] = np.exp(-self.logp_step * np.arange(_TABLE) / t)
        if q.size and q[-1].max() >= _TABLE:  # q is non-decreasing in rank: the last rank holds the max
            return np.exp(-self.logp_step / t * q)
        return tables[t][q]

    def _log_keep_table(self) -> np.ndarray:
        """``log(1 - m)`` for each of the 256 tail codes."""
        if "_log_keep" not in self.__dict__:
            self.__dict__["_log_keep"] = np.log1p(-self.tail_masses(np.arange(256)))
        return self.__dict__["_log_keep"]

    def tail_masses(self, codes: np.ndarray) -> np.ndarray:
        """``compact/tail`` codes -> tail masses ``m_T = sigmoid(tail_step * (code - 128))``."""
        x = (codes.astype(np.float64) - TAIL_OFFSET) * self.tail_step
        return 1.0 / (1.0 + np.exp(-x))


def target_fidelity(reference: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray],
                    temperatures: Sequence[float], num_classes: int) -> np.ndarray:
    """How far ``decoded`` targets are from ``reference`` ones (same classes: indices are
    lossless), per temperature: ``[nT, 4]`` = (sum and max over rows of KL(reference || decoded)
    of the KD-topk target, rows, rows whose decoded top-1 class is the reference's and strictly
    above the others). The KD-topk target is the one the losses build
    (:func:`softlabels.targets.topk_distribution`): top-k probabilities ``exp(v/T - lse_T)``
    (renormalised if they sum past 1), the rest spread uniformly, or ``softmax(v/T)`` when
    k = C; the uniform parts share their classes, so their KL is ``m log(m / m')``."""
    out = np.zeros((len(temperatures), 4))
    for j, t in enumerate(temperatures):
        (lp, tp), (lq, tq) = (_topk_target(f, j, t, num_classes) for f in (reference, decoded))
        kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl += np.where(tp > 0, tp * (np.log(tp) - np.log(tq)), 0.0)
        kl = np.maximum(kl.reshape(-1), 0.0)
        q = lq.reshape(-1, lq.shape[-1])
        first = q[:, 0] > (q[:, 1:].max(axis=-1) if q.shape[-1] > 1 else -np.inf)
        out[j] = (kl.sum(), kl.max(initial=0.0), kl.size, int(first.sum()))
    return out


def _topk_target(f: Mapping[str, np.ndarray], j: int, t: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Log top-k probabilities ``[..., k]`` and tail mass ``[...]`` of the KD-topk target at T."""
    v = np.asarray(f[TOPK_VALUES], dtype=np.float64) / t
    if v.shape[-1] >= num_classes:
        return v - _logsumexp(v)[..., None], np.zeros(v.shape[:-1])
    lp = v - np.asarray(f[LOGSUMEXP], dtype=np.float64)[..., j, None]
    total = np.exp(lp).sum(-1)
    lp = lp - np.log(np.maximum(total, 1.0))[..., None]
    return lp, np.maximum(1.0 - total, 0.0)


def _quantise(x: np.ndarray, step: float, top: int) -> np.ndarray:
    return np.clip(np.round(np.maximum(x, 0.0) / step), 0, top).astype(np.int64)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.sum(np.exp(x - top), axis=-1)) + top[..., 0]


def codec_from_schema(codec: Mapping[str, Any] | None, *, num_classes: int, k: int,
                      temperatures: Sequence[float]) -> CompactCodec | None:
    """The codec a schema records: None for the fp16 codec (``codec`` absent or null)."""
    if codec is None:
        return None
    return CompactCodec.from_dict(codec, num_classes=num_classes, k=k, temperatures=temperatures)
