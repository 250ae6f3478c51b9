"""The report's figures: matplotlib (Agg, no display), rendered to PNG bytes for embedding."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # headless; before pyplot is imported anywhere in the process
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, TwoSlopeNorm  # noqa: E402

from softlabels.report.stats import CONFIDENCE_BINS, StoreStats  # noqa: E402

MAX_HEATMAP_CLASSES = 50
DPI = 110
BLUE, ORANGE, GREY = "#3366aa", "#dd7722", "#999999"
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "legend.frameon": False,
    "figure.constrained_layout.use": True,
}


@dataclass
class Figure:
    """One embedded figure: an id (for links and tests), a caption and how to draw it. Drawn
    (to PNG bytes) only when rendered, so the numbers of a report cost no plotting."""

    key: str
    caption: str
    draw: Callable[[], bytes]
    _png: bytes | None = field(default=None, repr=False)

    @property
    def png(self) -> bytes:
        if self._png is None:
            self._png = self.draw()
        return self._png


def _render(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float = 4.6, height: float = 3.3):
    with plt.rc_context(STYLE):
        return plt.subplots(figsize=(width, height))


def confidence_histogram(st: StoreStats) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = _figure()
        edges = np.linspace(0, 1, CONFIDENCE_BINS + 1)
        width = edges[1] - edges[0]
        frac = 1.0 / max(st.targets, 1)
        if st.labeled:
            right = st.confidence_correct * frac
            ax.bar(edges[:-1], right, width, align="edge", color=BLUE, label="top-1 = label")
            ax.bar(edges[:-1], st.confidence_counts * frac - right, width, bottom=right, align="edge", color=ORANGE,
                   label="top-1 ≠ label")
            ax.legend(loc="upper left")
        else:
            ax.bar(edges[:-1], st.confidence_counts * frac, width, align="edge", color=BLUE)
        ax.axvline(st.mean_confidence, color="k", lw=1, ls="--")
        ax.text(st.mean_confidence, ax.get_ylim()[1] * 0.95, f" mean {st.mean_confidence:.3f}", va="top",
                ha="right" if st.mean_confidence > 0.5 else "left")
        ax.set(xlim=(0, 1), xlabel="teacher's max probability at T = 1", ylabel="fraction of targets",
               title="Teacher confidence")
        return _render(fig)


def topk_mass_cdf(st: StoreStats) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = _figure()
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, len(st.temperatures)))
        lowest = 1.0
        for t, color in zip(st.temperatures, colors):
            x, cdf = st.mass_cdf(t)
            ax.step(x, cdf, where="post", color=color, label=f"T={t:g}  (mean {st.mass_mean(t):.3f})")
            lowest = min(lowest, st.mass_min[t])
        ax.set(xlim=(max(0.0, lowest - 0.02), 1.0), ylim=(0, 1.01), xlabel=f"mass kept by the stored top-{st.k}",
               ylabel="fraction of targets with at most x", title=f"Top-{st.k} mass captured (1 − mass = KD-topk's tail)")
        ax.legend(loc="upper left")
        return _render(fig)


def reliability_diagram(st: StoreStats) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = _figure(4.0, 3.6)
        n, conf, acc = st.reliability()
        edges = np.linspace(0, 1, len(n) + 1)
        width = edges[1] - edges[0]
        filled = n > 0
        ax.bar(edges[:-1][filled], acc[filled], width, align="edge", color=BLUE, edgecolor="white", label="accuracy")
        ax.hlines(conf[filled], edges[:-1][filled], edges[1:][filled], color=ORANGE, lw=2.5,
                  label="mean confidence")
        ax.plot([0, 1], [0, 1], color="k", lw=1, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (T = 1)", ylabel="accuracy",
               title=f"Reliability, ECE = {100 * st.ece:.2f} %")
        ax.legend(loc="upper left")
        return _render(fig)


def label_in_topk(st: StoreStats) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = _figure()
        rate = st.label_in_topk()
        ks = np.arange(1, st.k + 1)
        ax.plot(ks, rate, marker="o", color=BLUE)
        for j in (0, st.k - 1) if st.k > 1 else (0,):
            ax.annotate(f"{100 * rate[j]:.2f} %", (ks[j], rate[j]), textcoords="offset points", xytext=(0, -14),
                        ha="center")
        ax.set(xlabel="j (first j stored classes)", ylabel="label among them", title="Label in the stored top-j",
               xticks=ks if st.k <= 20 else None, ylim=(min(rate[0], 0.9) - 0.05, 1.005))
        return _render(fig)


def per_class_accuracy(st: StoreStats) -> bytes:
    acc = st.per_class_accuracy()
    with plt.rc_context(STYLE):
        wide = st.num_classes <= MAX_HEATMAP_CLASSES  # one bar per class; else a sorted curve
        fig, ax = _figure(max(4.6, min(9.0, 0.2 * st.num_classes)) if wide else 5.2, 3.1)
        if wide:
            ax.bar(np.arange(st.num_classes), acc, color=BLUE)
            ax.set(xlabel="class", xticks=np.arange(st.num_classes) if st.num_classes <= 20 else None)
        else:
            order = np.argsort(np.nan_to_num(acc, nan=-1.0))
            ax.plot(np.arange(st.num_classes), acc[order], color=BLUE)
            worst = ", ".join(str(c) for c in order[:5])
            ax.set(xlabel=f"classes sorted by accuracy (worst: {worst})")
        ax.axhline(st.accuracy, color="k", lw=1, ls="--")
        ax.set(ylim=(0, 1.02), ylabel="teacher top-1 accuracy", title=f"Per-class teacher accuracy (overall {100 * st.accuracy:.2f} %)")
        return _render(fig)


def select_classes(matrix: np.ndarray, limit: int = MAX_HEATMAP_CLASSES) -> tuple[np.ndarray, str]:
    """Which classes a C x C map shows, and a sentence saying how they were chosen. Up to
    ``limit`` classes: all, in class order. More: the ``limit`` classes with the largest
    off-diagonal mass (row + column: most confused, either way), ordered by average-linkage
    clustering of their rows so that classes the teacher confuses sit together."""
    c = matrix.shape[0]
    if c <= limit:
        return np.arange(c), f"all {c} classes, in class order"
    off = np.nan_to_num(matrix.copy())
    np.fill_diagonal(off, 0.0)
    chosen = np.sort(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:limit])
    from scipy.cluster.hierarchy import leaves_list, linkage

    rows = np.nan_to_num(matrix[np.ix_(chosen, chosen)])
    order = leaves_list(linkage(rows, method="average", metric="euclidean"))
    return chosen[order], (f"the {limit} most confused of {c} classes (largest off-diagonal mass, row + column), "
                           "ordered by average-linkage clustering of their rows")


def _ticks(ax, classes: np.ndarray) -> None:
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), [str(c) for c in classes])
        ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    else:
        step = max(1, len(classes) // 10)
        ax.set_xticks(range(0, len(classes), step), [str(c) for c in classes[::step]], rotation=90)
        ax.set_yticks(range(0, len(classes), step), [str(c) for c in classes[::step]])
    ax.grid(False)


def similarity_heatmap(matrix: np.ndarray, classes: np.ndarray, t: float, grouped_by: str) -> bytes:
    """Tang et al. 2020, Fig. 1: row c = the teacher's mean distribution over class-c targets.
    Log colour scale, so the diagonal and the small off-diagonal similarities both read."""
    sub = matrix[np.ix_(classes, classes)]
    with plt.rc_context(STYLE):
        fig, ax = _figure(5.2, 4.5)
        positive = sub[np.isfinite(sub) & (sub > 0)]
        low = max(float(positive.min()) if positive.size else 1e-6, 1e-6)
        high = float(positive.max()) if positive.size else 1.0
        high = high if high > low else low * 10
        image = ax.imshow(np.clip(sub, low, high), cmap="YlGnBu", norm=LogNorm(vmin=low, vmax=high),
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85, label="mean probability")
        _ticks(ax, classes)
        ax.set(xlabel="class of the teacher's distribution", ylabel=grouped_by,
               title=f"Class similarity: mean teacher distribution, T = {t:g}")
        return _render(fig)


def similarity_difference(diff: np.ndarray, classes: np.ndarray, t: float, names: tuple[str, str]) -> bytes:
    sub = diff[np.ix_(classes, classes)]
    bound = float(np.nanmax(np.abs(sub))) if np.isfinite(sub).any() else 1.0
    bound = bound if bound > 0 else 1e-9
    with plt.rc_context(STYLE):
        fig, ax = _figure(5.2, 4.5)
        image = ax.imshow(sub, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound), interpolation="nearest")
        fig.colorbar(image, ax=ax, shrink=0.85, label="difference of mean probability")
        _ticks(ax, classes)
        ax.set(xlabel="class", ylabel="true class", title=f"Similarity map difference, T = {t:g}\n{names[1]} − {names[0]}")
        return _render(fig)


def view_spread(st: StoreStats) -> bytes:
    with plt.rc_context(STYLE):
        fig, ax = _figure()
        edges = st.view_kl_edges()
        ax.stairs(st.view_kl_counts / max(st.view_kl_rows, 1), edges, fill=True, color=BLUE)
        ax.axvline(st.view_kl_mean, color="k", lw=1, ls="--")
        used = np.flatnonzero(st.view_kl_counts)
        lo = edges[used[0]] if used.size else edges[0]
        ax.set(xscale="log", xlim=(lo, edges[-1]), xlabel=f"mean KL(view ‖ view average) in nats, T = "
               f"{st.similarity_temperature:g} (at most log {st.views})", ylabel="fraction of samples",
               title=f"Spread of the targets across {st.views} views (mean {st.view_kl_mean:.4f})")
        return _render(fig)


def accuracy_curves(groups) -> bytes:
    """Test accuracy per epoch: one line per recipe (mean over seeds), a band of ± 1 std."""
    with plt.rc_context(STYLE):
        fig, ax = _figure(6.4, 3.9)
        colors = plt.get_cmap("tab10")
        finals = []
        for i, group in enumerate(groups):
            curves = group.curves()
            if curves is None:
                continue
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = 100 * curves.mean(0), 100 * curves.std(0, ddof=1) if curves.shape[0] > 1 else 0 * curves[0]
            ax.plot(epochs, mean, color=colors(i % 10), lw=1.4, label=f"{group.label} (n={curves.shape[0]})")
            ax.fill_between(epochs, mean - std, mean + std, color=colors(i % 10), alpha=0.18, lw=0)
            finals.append(mean[-1])
        if finals:  # the interesting part is the top: start the axis near the worst final accuracy
            ax.set_ylim(max(0.0, min(finals) - 15), min(100.0, max(finals) + 3))
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Students: test accuracy per epoch (mean ± 1 std over seeds)")
        ax.legend(loc="lower right", fontsize=7.5)
        return _render(fig)
