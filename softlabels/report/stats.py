"""The numbers behind a store report, in one vectorised pass over the store's arrays.

Rows are read in blocks of whole chunks straight from the Zarr arrays (no per-row work); every
figure is accumulated as counts or sums, so memory stays bounded whatever the store's size. The
probabilities come from :mod:`softlabels.targets` (the same maths the trainer uses): a stored
class's probability at T is ``exp(value / T - lse_T)``; a dense teacher distribution is the
KD-topk target (exact top-k, the tail mass spread uniformly), the best the store can say about
the classes it does not keep.

Statistics are over every stored (sample, view) target unless said otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from softlabels.errors import InvalidTargetsError
from softlabels.stores import SoftLabelStore
from softlabels.stores import format as fmt
from softlabels.targets import TeacherTarget, tail_mass, temperature_index, topk_distribution, topk_log_probs

#: Equal-width confidence bins of the reliability diagram and ECE (Guo et al. 2017 use 15).
RELIABILITY_BINS = 15
CONFIDENCE_BINS = 40
MASS_BINS = 1000
VIEW_KL_BINS = 60
#: The view-spread histogram has log-spaced bins from here to log V (smaller values go in the first).
VIEW_KL_FLOOR = 1e-6
#: Above this many classes the C x C class-similarity matrix is not computed (memory: C^2 doubles).
MAX_SIMILARITY_CLASSES = 4096
#: Dense [rows, C] distributions are built this many elements at a time.
DENSE_ELEMENTS = 1 << 22
BLOCK_ROWS = 1 << 16
#: The view spread needs dense [rows, V, C] distributions; past this many elements in all (a few
#: seconds here) it is measured on every n-th block of rows, and the report says so.
VIEW_SPREAD_ELEMENTS = 1 << 30


@dataclass
class StoreStats:
    """Everything the report shows about one store; histograms are counts over ``targets``."""

    location: str
    num_samples: int
    num_classes: int
    k: int
    views: int
    temperatures: tuple[float, ...]
    labeled: bool
    similarity_temperature: float
    targets: int = 0
    confidence_counts: np.ndarray = field(default_factory=lambda: np.zeros(CONFIDENCE_BINS, np.int64))
    confidence_correct: np.ndarray = field(default_factory=lambda: np.zeros(CONFIDENCE_BINS, np.int64))
    confidence_sum: float = 0.0
    reliability_counts: np.ndarray = field(default_factory=lambda: np.zeros(RELIABILITY_BINS, np.int64))
    reliability_confidence: np.ndarray = field(default_factory=lambda: np.zeros(RELIABILITY_BINS))
    reliability_correct: np.ndarray = field(default_factory=lambda: np.zeros(RELIABILITY_BINS))
    mass_counts: dict[float, np.ndarray] = field(default_factory=dict)
    mass_sum: dict[float, float] = field(default_factory=dict)
    mass_min: dict[float, float] = field(default_factory=dict)
    label_rank_counts: np.ndarray | None = None  # [k + 1]: label at rank r (k = not stored)
    class_counts: np.ndarray | None = None  # [C] targets per true class
    class_correct: np.ndarray | None = None  # [C] of which top-1 == label
    similarity_sum: np.ndarray | None = None  # [C, C] sum over rows of (probs - fill) at their top-k
    similarity_fill: np.ndarray | None = None  # [C] sum over rows of the tail fill (every class gets it)
    similarity_rows: np.ndarray | None = None  # [C] rows summed into each similarity row
    view_kl_counts: np.ndarray | None = None
    view_kl_sum: float = 0.0
    view_kl_rows: int = 0  # samples behind the view-spread histogram
    view_block_stride: int = 1  # every n-th block of rows feeds it (dense [rows, V, C] work is bounded)
    view_blocks_seen: int = 0
    view_top1_agree: int = 0

    # -- derived figures -------------------------------------------------------------
    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / max(self.targets, 1)

    @property
    def accuracy(self) -> float | None:
        return None if self.class_counts is None else float(self.class_correct.sum() / max(self.targets, 1))

    @property
    def ece(self) -> float | None:
        """Expected calibration error at T = 1: ``sum_b n_b / n * |acc_b - conf_b|``."""
        if not self.labeled:
            return None
        gap = np.abs(self.reliability_correct - self.reliability_confidence).sum()
        return float(gap / max(self.targets, 1))

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: count, mean confidence, accuracy (NaN in empty bins)."""
        n = self.reliability_counts
        with np.errstate(invalid="ignore", divide="ignore"):
            return n, self.reliability_confidence / n, self.reliability_correct / n

    def mass_mean(self, t: float) -> float:
        return self.mass_sum[t] / max(self.targets, 1)

    def mass_cdf(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """``(x, F(x))``: the fraction of targets whose top-k keeps at most mass x, at T."""
        edges = np.linspace(0.0, 1.0, MASS_BINS + 1)
        return edges, np.concatenate([[0.0], np.cumsum(self.mass_counts[t]) / max(self.targets, 1)])

    def label_in_topk(self) -> np.ndarray | None:
        """``[k]``: the fraction of targets whose label is among the first j stored classes, j = 1..k."""
        if self.label_rank_counts is None:
            return None
        return np.cumsum(self.label_rank_counts[: self.k]) / max(self.targets, 1)

    def per_class_accuracy(self) -> np.ndarray | None:
        if self.class_counts is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.class_correct / self.class_counts

    def similarity(self) -> np.ndarray | None:
        """``[C, C]``: row c is the teacher's mean distribution over the targets of class c
        (NaN rows for classes with no targets)."""
        if self.similarity_sum is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.similarity_sum + self.similarity_fill[:, None]) / self.similarity_rows[:, None]

    @property
    def view_kl_mean(self) -> float | None:
        return None if self.view_kl_counts is None else self.view_kl_sum / max(self.view_kl_rows, 1)

    def view_kl_edges(self) -> np.ndarray:
        """Log-spaced bin edges of the view-spread histogram, up to log V (KL(p_v || mean_v p) <= log V)."""
        return np.geomspace(VIEW_KL_FLOOR, math.log(max(self.views, 2)), VIEW_KL_BINS + 1)


def default_temperature(stores: Sequence[SoftLabelStore], requested: float | None = None) -> float:
    """The temperature of the class-similarity maps and store comparisons: ``requested`` (it
    must be in every store's grid), else the common stored T closest to 4 (Tang et al. show
    their similarity structure at a raised T), else 1 -- always exact, since stored values are
    the T = 1 log-probabilities."""
    if requested is not None:
        for store in stores:
            check_temperature(store, requested)
        return float(requested)
    common = set(stores[0].temperatures).intersection(*(s.temperatures for s in stores[1:]))
    if not common:
        return 1.0
    return min(common, key=lambda t: (abs(math.log(t / 4.0)), t))


def lse_column(lse: torch.Tensor, temperatures: Sequence[float], t: float) -> torch.Tensor:
    """``logsumexp(z / t)`` from a ``[..., nT]`` block; for t = 1 it is 0 by the format (§2)
    whether or not 1 is in the grid."""
    if float(t) == 1.0 and all(abs(float(g) - 1.0) > 1e-6 for g in temperatures):
        return lse.new_zeros(lse.shape[:-1])
    return lse[..., temperature_index(temperatures, t)]


def blocks(store: SoftLabelStore, names: Sequence[str], block_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Whole-chunk row blocks of the named arrays (about ``BLOCK_ROWS`` rows), read straight from Zarr: one pass."""
    chunk = store.schema.rows_per_chunk
    rows = max(chunk, (block_rows or BLOCK_ROWS) // chunk * chunk)
    arrays = {name: store.array(name) for name in names}
    for start in range(0, store.num_samples, rows):
        yield {name: arr[start : start + rows] for name, arr in arrays.items()}


def as_tensors(block: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, arr in block.items():
        if name == fmt.TOPK_INDICES or name == fmt.LABELS:
            out[name] = torch.from_numpy(arr.astype(np.int64))
        else:
            out[name] = torch.from_numpy(arr.astype(np.float32))
    return out


def dense_targets(values: torch.Tensor, indices: torch.Tensor, lse_t: torch.Tensor, t: float, num_classes: int
                  ) -> Iterator[tuple[slice, torch.Tensor]]:
    """The teacher's dense KD-topk distribution at t, ``[rows, ..., C]``, a bounded slice of
    rows at a time (``values [B, ..., k]``)."""
    per_row = num_classes * int(np.prod(values.shape[1:-1], dtype=np.int64))
    step = max(1, DENSE_ELEMENTS // max(per_row, 1))
    for start in range(0, values.shape[0], step):
        rows = slice(start, start + step)
        yield rows, topk_distribution(values[rows], indices[rows], lse_t[rows], t, num_classes)


def sparse_targets(values: torch.Tensor, indices: torch.Tensor, lse_t: torch.Tensor, t: float, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KD-topk distribution at t (:meth:`softlabels.targets.TeacherTarget.topk`) in sparse
    form: ``probs [..., k]`` at classes ``index [..., k]`` and ``fill [...]``, the probability of
    each other class (0 when k = C, where the target comes dense, in class order)."""
    target = TeacherTarget.topk(values, indices, lse_t, t, num_classes)
    if target.index is None:
        index = torch.arange(num_classes).expand(target.probs.shape)
        return target.probs, index, target.probs.new_zeros(target.probs.shape[:-1])
    return target.probs, target.index, target.fill[..., 0]


def sparse_kl(pa: torch.Tensor, ia: torch.Tensor, fa: torch.Tensor, pb: torch.Tensor, ib: torch.Tensor,
              fb: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[M]`` KL(a || b) of two sparse KD-topk distributions (:func:`sparse_targets`) in
    O(k_a k_b) per row: a's top-k classes, b's top-k classes a does not keep, and the rest, where
    both are their fills."""
    match = ia[:, :, None] == ib[:, None, :]  # [M, ka, kb]
    pb_at_a = torch.where(match.any(-1), (match * pb[:, None, :]).sum(-1), fb[:, None])
    only_b = ~match.any(1)  # [M, kb]
    log = lambda x: x.clamp(min=1e-30).log()  # noqa: E731
    kl = (torch.xlogy(pa, pa) - pa * log(pb_at_a)).sum(-1)
    kl += ((torch.xlogy(fa, fa)[:, None] - fa[:, None] * log(pb)) * only_b).sum(-1)
    rest = num_classes - ia.shape[-1] - only_b.sum(-1)
    kl += rest * (torch.xlogy(fa, fa) - fa * log(fb))
    return kl.clamp(min=0.0)


def _bins(x: torch.Tensor, n: int) -> np.ndarray:
    """Equal-width bins of [0, 1]."""
    return (x * n).floor().clamp(0, n - 1).long().numpy()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The report's tensor work is short element-wise passes over blocks: a second intra-op thread
    gains little alone and loses several-fold on a busy machine (measured: 5x wall time at load 30
    on 2 cores), so it runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_store_stats(store: SoftLabelStore, temperature: float) -> StoreStats:
    """One pass over ``store``; ``temperature`` is the class-similarity / view-spread T."""
    s = store.schema
    c, k, v = s.num_classes, s.k, s.views
    st = StoreStats(store.location, s.num_samples, c, k, v, s.temperatures, s.labeled, float(temperature))
    for t in s.temperatures:
        st.mass_counts[t] = np.zeros(MASS_BINS, np.int64)
        st.mass_sum[t], st.mass_min[t] = 0.0, 1.0
    if s.labeled:
        st.label_rank_counts = np.zeros(k + 1, np.int64)
        st.class_counts, st.class_correct = np.zeros(c, np.int64), np.zeros(c, np.int64)
    if c <= MAX_SIMILARITY_CLASSES:
        st.similarity_sum, st.similarity_fill, st.similarity_rows = np.zeros((c, c)), np.zeros(c), np.zeros(c)
    if v > 1:
        st.view_kl_counts = np.zeros(VIEW_KL_BINS, np.int64)
        st.view_block_stride = max(1, math.ceil(s.num_samples * v * c / VIEW_SPREAD_ELEMENTS))
    names = [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP] + ([fmt.LABELS] if s.labeled else [])
    with torch.no_grad(), one_torch_thread():
        for raw in blocks(store, names):
            _accumulate(st, as_tensors(raw))
    return st


def _accumulate(st: StoreStats, b: dict[str, torch.Tensor]) -> None:
    values, indices, lse = b[fmt.TOPK_VALUES], b[fmt.TOPK_INDICES], b[fmt.LOGSUMEXP]
    rows, v, k = values.shape
    c = st.num_classes
    flat_v, flat_i, flat_l = values.reshape(-1, k), indices.reshape(-1, k), lse.reshape(rows * v, -1)
    st.targets += rows * v
    conf = topk_log_probs(flat_v[:, :1], lse_column(flat_l, st.temperatures, 1.0), 1.0).exp()[:, 0].clamp(0, 1)
    st.confidence_sum += float(conf.double().sum())
    conf_bin = _bins(conf, CONFIDENCE_BINS)
    st.confidence_counts += np.bincount(conf_bin, minlength=CONFIDENCE_BINS)
    for t in st.temperatures:
        mass = 1.0 - tail_mass(flat_v, lse_column(flat_l, st.temperatures, t), t)
        st.mass_counts[t] += np.bincount(_bins(mass, MASS_BINS), minlength=MASS_BINS)
        st.mass_sum[t] += float(mass.double().sum())
        st.mass_min[t] = min(st.mass_min[t], float(mass.min()))
    top1 = flat_i[:, 0]
    labels = b.get(fmt.LABELS)
    if labels is not None:
        y = labels.repeat_interleave(v)
        correct = (top1 == y).numpy()
        st.confidence_correct += np.bincount(conf_bin, weights=correct, minlength=CONFIDENCE_BINS).astype(np.int64)
        rel = _bins(conf, RELIABILITY_BINS)
        st.reliability_counts += np.bincount(rel, minlength=RELIABILITY_BINS)
        st.reliability_confidence += np.bincount(rel, weights=conf.double().numpy(), minlength=RELIABILITY_BINS)
        st.reliability_correct += np.bincount(rel, weights=correct, minlength=RELIABILITY_BINS)
        hit = flat_i == y[:, None]
        rank = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(y, k))
        st.label_rank_counts += np.bincount(rank.numpy(), minlength=k + 1)
        st.class_counts += np.bincount(y.numpy(), minlength=c)
        st.class_correct += np.bincount(y.numpy(), weights=correct, minlength=c).astype(np.int64)
        group = y  # Tang et al.: rows grouped by true class
    else:
        group = top1  # no labels (a transfer set): rows grouped by the teacher's top-1 class
    t = st.similarity_temperature
    lse_t = lse_column(flat_l, st.temperatures, t)
    if st.similarity_sum is not None:  # sparse: each row adds its fill everywhere, probs - fill on its top-k
        probs, index, fill = sparse_targets(flat_v, flat_i, lse_t, t, c)
        flat = (group[:, None] * c + index).reshape(-1)
        sim = torch.from_numpy(st.similarity_sum).view(-1)
        sim.index_add_(0, flat, (probs - fill[:, None]).reshape(-1).double())
        st.similarity_fill += np.bincount(group.numpy(), weights=fill.double().numpy(), minlength=c)
        st.similarity_rows += np.bincount(group.numpy(), minlength=c)
    if v > 1:
        tops = indices[:, :, 0]
        st.view_top1_agree += int((tops == tops[:, :1]).all(-1).sum())
        st.view_blocks_seen += 1
        if (st.view_blocks_seen - 1) % st.view_block_stride:
            return
        st.view_kl_rows += rows
        lse_v = lse_t.reshape(rows, v)
        for part, dense in dense_targets(values, indices, lse_v, t, c):
            kl = view_spread(dense)
            edges = st.view_kl_edges()
            where = np.searchsorted(edges, kl.numpy(), side="right") - 1
            st.view_kl_counts += np.bincount(where.clip(0, VIEW_KL_BINS - 1), minlength=VIEW_KL_BINS)
            st.view_kl_sum += float(kl.double().sum())


def view_spread(dense: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over views of KL(p_v || p_bar), ``p_bar`` the view average (``dense [B, V, C]``)."""
    mean = dense.mean(1, keepdim=True)
    return kl_divergence(dense, mean).mean(-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_c p log(p / q)`` over the last axis (0 log 0 = 0; q is floored at 1e-30)."""
    return (torch.xlogy(p, p) - p * q.clamp(min=1e-30).log()).sum(-1).clamp(min=0.0)


def store_header(store: SoftLabelStore, verify_status: str) -> list[tuple[str, str]]:
    """The store's identity card: (field, value) rows."""
    s, meta = store.schema, store.meta
    teacher, ds = dict(s.teacher), dict(s.dataset)
    size = store.bytes_on_disk()
    aug = s.augmentation
    return [
        ("location", store.location),
        ("teacher", str(teacher.get("spec", "?"))),
        ("checkpoint sha256", str(teacher.get("checkpoint_sha256") or "n/a")),
        ("dataset", str(ds.get("spec", "?"))),
        ("split", str(ds.get("split", "?"))),
        ("samples", f"{s.num_samples:,}"),
        ("classes", f"{s.num_classes:,}"),
        ("k", str(s.k)),
        ("temperatures", ", ".join(f"{t:g}" for t in s.temperatures)),
        ("views", str(s.views) + (f" ({aug.get('policy')})" if aug else "")),
        ("labels", "yes" if s.labeled else "no (transfer set)"),
        ("values", s.value_dtype),
        ("bytes/sample", f"{size / s.num_samples:.1f} ({size:,} B on disk)"),
        ("format version", str(meta.format_version)),
        ("verify", verify_status),
    ]


def check_temperature(store: SoftLabelStore, t: float) -> None:
    """A clear error when ``t`` cannot be reconstructed from ``store`` (T = 1 always can)."""
    if float(t) != 1.0:
        try:
            temperature_index(store.temperatures, t)
        except InvalidTargetsError:
            grid = ", ".join(f"{g:g}" for g in store.temperatures)
            raise InvalidTargetsError(
                f"-T {t:g} is not stored in {store.location} (its temperatures: {grid}); pass -T one of those, or 1"
            ) from None


def summary_row(st: StoreStats) -> dict[str, Any]:
    """Headline numbers of one store (for the Markdown summary and tests)."""
    out: dict[str, Any] = {"mean confidence (T=1)": st.mean_confidence}
    for t in st.temperatures:
        out[f"top-k mass T={t:g}"] = st.mass_mean(t)
    if st.labeled:
        out["teacher top-1 accuracy"] = st.accuracy
        out[f"label in top-{st.k}"] = float(st.label_in_topk()[-1])
        out["ECE (T=1, 15 bins)"] = st.ece
    if st.views > 1:
        out[f"view spread: mean KL to view average (T={st.similarity_temperature:g})"] = st.view_kl_mean
        out["views agreeing on top-1"] = st.view_top1_agree / st.num_samples
    return out
