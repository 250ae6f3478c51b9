"""Fidelity figures of a store (FORMAT.md §3 ``summary``), computed at finalize from the stored
arrays exactly as a student will read them; on the way, every unit's target arrays are re-hashed
against ``units/sha256`` (FORMAT.md §5, "Ownership")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from softlabels.errors import IncompleteStoreError
from softlabels.stores import format as fmt
from softlabels.stores.codecs import compact_store
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
    hashed = [name for name in order if not name.startswith(fmt.FEATURES_PREFIX)]
    recorded = writer._array(fmt.UNITS_SHA256)[...]
    changed = []
    clamped = {name: 0 for name in fmt.CLAMPED_LOG_PROBS if schema.labeled or name != fmt.LABEL_LOGIT}
    feature_sums = {name: np.zeros(3) for name, _ in schema.features}  # sum, sum of squares, count
    for unit in range(schema.num_units):
        start, stop = schema.unit_range(unit)
        stored = {name: writer._array(name)[start:stop] for name in hashed}
        if any(unit_digest(a) != bytes(recorded[unit, order.index(n)]) for n, a in stored.items()):
            changed.append(unit)  # written again after it was recorded: by a writer that lost the store
            continue
        fields = writer.read_fields(start, stop, [fmt.TOPK_VALUES, fmt.LOGSUMEXP, fmt.TOPK_INDICES])
        values = fields[fmt.TOPK_VALUES].astype(np.float64)  # [n, V, k]
        lse = fields[fmt.LOGSUMEXP].astype(np.float64)  # [n, V, T]
        indices = fields[fmt.TOPK_INDICES]  # [n, V, k]
        labels = stored[fmt.LABELS][:, None, None] if schema.labeled else None
        if schema.value_dtype == "float16":
            clamped[fmt.TOPK_VALUES] += int((values == fmt.FLOAT16_MIN).sum())
            if schema.labeled:
                clamped[fmt.LABEL_LOGIT] += int((writer._array(fmt.LABEL_LOGIT)[start:stop] == fmt.FLOAT16_MIN).sum())
        for name, sums in feature_sums.items():
            array = writer._array(fmt.FEATURES_PREFIX + name)
            for s0 in range(start, stop, schema.rows_per_chunk):  # chunk by chunk: features are wide
                block = array[s0 : min(s0 + schema.rows_per_chunk, stop)].astype(np.float64)
                sums += (block.sum(), np.square(block).sum(), block.size)
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
        if schema.k == schema.num_classes:  # every class stored: the mass is 1 by construction, the
            a["mass_sum"][:], a["mass_min"][:] = n, 1.0  # sum above only adds float16 rounding
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
    if feature_sums:  # scale of the stored features: a hint loss on raw features scales with RMS²
        summary["features"] = {
            name: {"mean": float(total / max(n, 1)), "rms": float(np.sqrt(squares / max(n, 1)))}
            for name, (total, squares, n) in feature_sums.items()
        }
    if schema.value_dtype == "float16":
        summary["float16_clamped"] = clamped  # values at the float16 bound -65504 (FORMAT.md §2)
    if schema.codec is not None:
        summary["codec_fidelity"] = compact_store.fidelity_summary(schema, writer._array(fmt.UNITS_CODEC_FIDELITY)[...])
    return summary
