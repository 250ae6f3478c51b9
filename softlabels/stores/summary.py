"""Fidelity figures of a store (FORMAT.md §3 ``summary``), computed at finalize from the stored
arrays exactly as a student will read them; on the way, every unit's target arrays are re-hashed
against ``units/sha256`` (FORMAT.md §5, "Ownership")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from softlabels.errors import IncompleteStoreError
from softlabels.stores import format as fmt
from softlabels.stores.digest import unit_digest

if TYPE_CHECKING:
    from softlabels.stores.writer import StoreWriter


def compute_summary(writer: StoreWriter) -> dict[str, Any]:
    """Fidelity figures over the whole store, read unit by unit (bounded memory).

    Per stored T the mean and minimum top-k probability mass (how much of the teacher's
    distribution the stored classes carry); for labelled stores the teacher's top-1 accuracy
    (top-1 class == label, i.e. its agreement with the labels) and ``label_in_topk`` (how often
    the stored top-k contains the label, i.e. how often KD-topk's explicit classes include the
    true one). Figures are over every (sample, view); stores with several views also get the
    same figures for view 0 alone under ``view0``. Unlabelled stores record None.
    """
    schema = writer.schema
    temps = schema.temperatures
    scopes = {"all": slice(None), "view0": slice(0, 1)} if schema.views > 1 else {"all": slice(None)}
    acc = {
        scope: {"mass_sum": np.zeros(len(temps)), "mass_min": np.full(len(temps), np.inf), "count": 0, "top1": 0,
                "in_topk": 0}
        for scope in scopes
    }
    order = [a.name for a in schema.per_sample_arrays()]
    recorded = writer._array(fmt.UNITS_SHA256)[...]
    changed = []
    for unit in range(schema.num_units):
        start, stop = schema.unit_range(unit)
        raw = {name: writer._array(name)[start:stop] for name in (fmt.TOPK_VALUES, fmt.LOGSUMEXP, fmt.TOPK_INDICES)}
        if schema.labeled:
            raw[fmt.LABELS] = writer._array(fmt.LABELS)[start:stop]
        if any(unit_digest(a) != bytes(recorded[unit, order.index(n)]) for n, a in raw.items()):
            changed.append(unit)  # written again after it was recorded: by a writer that lost the store
            continue
        values = raw[fmt.TOPK_VALUES].astype(np.float64)  # [n, V, k]
        lse = raw[fmt.LOGSUMEXP].astype(np.float64)  # [n, V, T]
        indices = raw[fmt.TOPK_INDICES]  # [n, V, k]
        labels = raw[fmt.LABELS][:, None, None] if schema.labeled else None
        for scope, views in scopes.items():
            a = acc[scope]
            for j, t in enumerate(temps):
                mass = np.exp(values[:, views] / t - lse[:, views, j : j + 1]).sum(-1)
                a["mass_sum"][j] += mass.sum()
                a["mass_min"][j] = min(a["mass_min"][j], float(mass.min()))
            a["count"] += values[:, views].shape[0] * values[:, views].shape[1]
            if labels is not None:
                hit = indices[:, views] == labels  # [n, v, k]
                a["top1"] += int(hit[..., 0].sum())
                a["in_topk"] += int(hit.any(-1).sum())

    if changed:
        for unit in changed:
            writer._array(fmt.UNITS_COMPLETE)[unit] = 0
        raise IncompleteStoreError(
            f"{writer.location}: {len(changed)} recorded unit(s) changed after they were recorded (first: unit "
            f"{changed[0]}), e.g. by a dump that was replaced with --overwrite while it ran; they are marked "
            "unwritten: rerun the dump with --resume to redo them"
        )

    def figures(a: dict[str, Any]) -> dict[str, Any]:
        n = a["count"]
        return {
            "topk_mass": {
                f"{t:g}": {"mean": float(a["mass_sum"][j] / n), "min": float(a["mass_min"][j])}
                for j, t in enumerate(temps)
            },
            "teacher_top1_accuracy": a["top1"] / n if schema.labeled else None,
            "label_in_topk": a["in_topk"] / n if schema.labeled else None,
        }

    summary: dict[str, Any] = {"rows": int(schema.num_samples), "views": int(schema.views), **figures(acc["all"])}
    if "view0" in acc:
        summary["view0"] = figures(acc["view0"])
    return summary
