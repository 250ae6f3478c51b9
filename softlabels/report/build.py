"""Assemble a report: open and check the inputs, compute the numbers, draw the figures, lay out
the sections. The teacher is never needed: everything comes from the stores and metrics.json."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


from softlabels import __version__
from softlabels.errors import IncompleteStoreError, SoftlabelsError
from softlabels.report import figures as F
from softlabels.report.compare import Agreement, check_same_dataset, comparable_pairs, compare_stores
from softlabels.report.html import Section, Table, render_html, render_markdown
from softlabels.report.runs import RunGroup, find_runs, group_runs
from softlabels.report.stats import MAX_SIMILARITY_CLASSES, StoreStats, compute_store_stats, default_temperature, store_header, summary_row
from softlabels.stores import SoftLabelStore, open_store


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    stats: list[StoreStats] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)
    groups: list[RunGroup] = field(default_factory=list)

    def html(self) -> str:
        return render_html(self.title, self.subtitle, self.sections)

    def markdown(self) -> str:
        return render_markdown(self.title, self.subtitle, self.sections)

    def figures(self) -> list[F.Figure]:
        return [f for s in self.sections for f in s.figures]


def open_for_report(location: str, storage_options: dict | None = None) -> SoftLabelStore:
    store = open_store(location, allow_incomplete=True, storage_options=storage_options)
    if store.meta.status != "complete":
        raise IncompleteStoreError(
            f"{location} is incomplete (status '{store.meta.status}'); finish it with `softlabels dump ... --resume` "
            "before reporting on it"
        )
    return store


def build_report(
    stores: list[str],
    runs: list[str] | None = None,
    *,
    temperature: float | None = None,
    verify: bool = True,
    storage_options: dict | None = None,
) -> Report:
    """Everything `softlabels report` shows, for stores and/or run directories."""
    if not stores and not runs:
        raise SoftlabelsError("nothing to report: pass one or more stores and/or --runs DIR")
    opened = [open_for_report(s, storage_options) for s in stores]
    if len(opened) > 1:
        check_same_dataset(opened)
    groups = group_runs(find_runs(runs)) if runs else []  # bad --runs fail before the long part
    sections: list[Section] = []
    report = Report("softlabels report", "", sections, groups=groups)
    t = default_temperature(opened, temperature) if opened else 1.0
    for i, store in enumerate(opened):
        status = _verify_status(store, storage_options) if verify else "not run (--no-verify)"
        try:
            st = compute_store_stats(store, t)
        except Exception as exc:  # a damaged chunk that does not decode: say what verify found
            if not status.startswith("FAILED"):
                raise
            raise SoftlabelsError(f"{store.location} is damaged ({status}); it cannot be read "
                                  f"({type(exc).__name__}); run `softlabels verify {store.location}`") from None
        report.stats.append(st)
        sections.append(_store_section(i, store, st, status))
    pairs = comparable_pairs(opened)
    if pairs:
        sections.append(_comparison_section(opened, report, pairs, t))
    if groups:
        sections.append(_runs_section(groups))
    names = ", ".join(Path(s).name for s in stores) or "no stores"
    report.subtitle = (f"{names}; {len(groups)} student recipe(s) from {sum(len(g.runs) for g in groups)} run(s). "
                       f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by softlabels {__version__}.")
    return report


def _verify_status(store: SoftLabelStore, storage_options: dict | None) -> str:
    from softlabels.stores.verify import verify_store

    result = verify_store(store.location, storage_options=storage_options)
    if result.ok:
        return f"ok ({result.chunks_checked} chunks, {result.units_checked} units re-read)"
    return f"FAILED: {len(result.problems)} problem(s), first: {result.problems[0]}"


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f} %"


def _store_section(i: int, store: SoftLabelStore, st: StoreStats, verify_status: str) -> Section:
    name = Path(store.location).name
    section = Section(f"Store {i + 1}: {name}", f"store-{i + 1}")
    section.tables.append(Table("", ["field", "value"], [list(r) for r in store_header(store, verify_status)]))
    rows = [[key, f"{value:.4f}" if "KL" in key else _pct(value)] for key, value in summary_row(st).items()]
    rows += [[f"minimum top-k mass T={t:g}", _pct(st.mass_min[t])] for t in st.temperatures]
    section.tables.append(Table(f"What the teacher says ({st.targets:,} targets = samples x views)", ["figure", "value"], rows))
    key = f"store{i + 1}"
    figs = section.figures
    figs.append(F.Figure(f"{key}-confidence", "The teacher's confidence (max probability at T = 1); with labels, split "
                         "by whether its top-1 is right.", lambda: F.confidence_histogram(st)))
    if st.k >= st.num_classes:
        section.notes.append(f"k = C = {st.k}: the store keeps every class, so the top-k mass is 1 at every T and "
                             "KD-topk is the full teacher softmax (no mass figure).")
    else:
        figs.append(F.Figure(f"{key}-topk-mass", f"CDF of the probability mass the stored top-{st.k} keeps, per stored T. "
                             "KD-topk spreads the rest (1 − mass) uniformly over the other classes; mass near 1 "
                             "means the store loses little.", lambda: F.topk_mass_cdf(st)))
    if st.labeled:
        figs.append(F.Figure(f"{key}-reliability", f"Reliability at T = 1 over {len(st.reliability_counts)} equal-width "
                             "confidence bins; ECE = Σ n_b/n · |accuracy_b − confidence_b|. Orange above the bar: "
                             "over-confident.", lambda: F.reliability_diagram(st)))
        figs.append(F.Figure(f"{key}-label-in-topk", "How often the label is among the first j stored classes. A "
                             "label outside the top-k gets only the uniform tail share in KD-topk.", lambda: F.label_in_topk(st)))
        figs.append(F.Figure(f"{key}-per-class", "Teacher top-1 accuracy per true class; dashed: overall.",
                             lambda: F.per_class_accuracy(st)))
    matrix = st.similarity()
    if matrix is not None:
        classes, how = F.select_classes(matrix)
        grouped = "true class" if st.labeled else "teacher's top-1 class (no labels)"
        figs.append(F.Figure(f"{key}-similarity", f"Class similarity (Tang et al. 2020, Fig. 1): row c is the teacher's "
                             f"mean KD-topk distribution at T = {st.similarity_temperature:g} over targets grouped by "
                             f"{grouped}. Shown: {how}. Log colour scale.",
                             lambda: F.similarity_heatmap(matrix, classes, st.similarity_temperature, grouped)))
    else:
        section.notes.append(f"Class-similarity map not computed: {st.num_classes:,} classes is over the "
                             f"{MAX_SIMILARITY_CLASSES:,} whose {st.num_classes:,}² matrix the report holds in memory.")
    if st.views > 1:
        figs.append(F.Figure(f"{key}-view-spread", f"Per sample, the mean KL divergence of each view's target to the "
                             f"average over its {st.views} views (T = {st.similarity_temperature:g}). Large values: "
                             "the views disagree, so which view a student sees matters." + _sampled(st),
                             lambda: F.view_spread(st)))
    return section


def _sampled(st: StoreStats) -> str:
    if st.view_kl_rows >= st.num_samples:
        return ""
    return (f" Measured on {st.view_kl_rows:,} of {st.num_samples:,} samples (every {st.view_block_stride}th block of "
            "rows: the dense per-view distributions of every row would cost too much).")


def _comparison_section(stores: list[SoftLabelStore], report: Report, pairs: list[tuple[int, int]], t: float) -> Section:
    section = Section("Store comparison", "comparison")
    section.notes.append(f"Row-aligned targets of stores over the same dataset and split; distributions are the KD-topk "
                         f"targets at T = {t:g}; KL in nats.")
    rows = []
    for a, b in pairs:
        ag = compare_stores(stores[a], stores[b], t)
        report.agreements.append(ag)
        rows.append([Path(ag.a).name, Path(ag.b).name, ag.views, f"{ag.targets:,}", _pct(ag.top1_agreement),
                     f"{ag.kl_ab:.5f}", f"{ag.kl_ba:.5f}"])
        sa, sb = report.stats[a], report.stats[b]
        if sa.similarity() is not None and sb.similarity() is not None:
            diff = sb.similarity() - sa.similarity()
            classes, how = F.select_classes(sa.similarity())  # the classes of the reference store's map
            section.figures.append(F.Figure(
                f"diff-{a + 1}-{b + 1}", f"Class-similarity map of store {b + 1} minus store {a + 1} at T = {t:g} "
                f"(red: store {b + 1} puts more mass there). Shown: {how}.",
                lambda d=diff, cl=classes, n=(Path(ag.a).name, Path(ag.b).name): F.similarity_difference(d, cl, t, n)))
    section.tables.append(Table("Agreement", ["reference", "other", "views", "targets", "top-1 agreement",
                                              "mean KL(ref ‖ other)", "mean KL(other ‖ ref)"], rows))
    others = sorted({f"{Path(s.location).name} ({s.schema.dataset.get('split')})" for i, s in enumerate(stores)
                     if all(i not in p for p in pairs)})
    if others:
        section.notes.append("Not compared (no other store over the same split): " + ", ".join(others) + ".")
    return section


def _runs_section(groups: list[RunGroup]) -> Section:
    section = Section("Student runs", "runs")
    rows = []
    for g in groups:
        r = g.recipe
        stores = sorted({Path(p).name for run in g.runs for p in run.stores}) or ["none"]
        rows.append([g.label, str(len(g.runs)), f"{100 * g.mean:.2f} ± {100 * g.std:.2f}",
                     f"{100 * min(g.accuracies):.2f} – {100 * max(g.accuracies):.2f}", str(r.get("student", "?")),
                     str(r.get("epochs", "?")), ", ".join(stores)])
    section.tables.append(Table("Final test accuracy (%) per recipe, mean ± std over seeds",
                                ["recipe", "seeds", "test acc %", "range", "student", "epochs", "stores"], rows))
    per_run = []
    for g in groups:
        for run in g.runs:
            bps = run.metrics.get("store_bytes_per_sample")
            per_run.append([g.label, str(run.metrics.get("seed")), f"{100 * run.metrics['test_accuracy']:.2f}",
                            ", ".join(run.stores) or "none", "-" if bps is None else f"{bps:.1f}", str(run.path)])
    section.tables.append(Table("Each run and its store", ["recipe", "seed", "test acc %", "store(s)", "store B/sample",
                                                           "run directory"], per_run))
    without = [g.label for g in groups if g.curves() is None]
    if len(without) < len(groups):
        section.figures.append(F.Figure("runs-curves", "Test accuracy after each epoch; line: mean over seeds, band: "
                                        "± 1 standard deviation.", lambda: F.accuracy_curves(groups)))
    if without:
        section.notes.append("No per-epoch history in metrics.json (older runs), final accuracy only: "
                             + ", ".join(without) + ".")
    return section
