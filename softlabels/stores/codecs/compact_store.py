"""The compact codec at the store's edges: encoding a unit for the writer (after checking the
float fields it was given), the unit's fidelity record, and the store-wide fidelity summary
that ``softlabels info`` shows (docs/FORMAT.md §8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from softlabels.errors import InvalidTargetsError
from softlabels.stores import format as fmt
from softlabels.stores.codecs.compact import FIELDS, target_fidelity


def encode_unit(schema: fmt.StoreSchema, unit: int, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The compact codec's arrays of a unit, from its float fields (checked first, so that a bad
    value is named as the field the caller gave, not as a coded array); other fields pass."""
    wanted = [n for n in FIELDS if schema.labeled or n != fmt.LABEL_LOGIT]
    missing = sorted(set(wanted) - set(fields))
    if missing:
        raise InvalidTargetsError(f"unit {unit}: fields do not match the schema (missing {missing})")
    for name in wanted:
        if name != fmt.TOPK_INDICES and not np.isfinite(np.asarray(fields[name], dtype=np.float64)).all():
            raise InvalidTargetsError(
                f"unit {unit}: {name} contains NaN/inf; nothing was written for this unit "
                "(check the teacher checkpoint and input preprocessing)"
            )
    ids = np.asarray(fields[fmt.TOPK_INDICES])
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= schema.num_classes:
        raise InvalidTargetsError(f"unit {unit}: class indices outside 0..{schema.num_classes - 1}")
    coded = schema.compact.encode({n: fields[n] for n in wanted})
    return {**{n: a for n, a in fields.items() if n not in FIELDS}, **coded}


def unit_fidelity(schema: fmt.StoreSchema, fields: Mapping[str, np.ndarray], coded: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[nT, 4]``: per-T KL(float32 targets || decoded targets) sum and max, rows, top-1 agreements."""
    decoded = schema.compact.decode(coded, [fmt.TOPK_VALUES, fmt.LOGSUMEXP])
    return target_fidelity(fields, decoded, schema.temperatures, schema.num_classes)


def fidelity_summary(schema: fmt.StoreSchema, per_unit: np.ndarray) -> dict[str, Any]:
    """The store's fidelity from each unit's record ``[U, nT, (kl_sum, kl_max, rows,
    top1_agree)]``: per stored T the mean and max per-row KL(float32 teacher targets || decoded
    targets), and the top-1 agreement (its minimum over T)."""
    total = per_unit.sum(axis=0)
    rows = max(float(total[0, 2]), 1.0)
    return {
        "reference": "float32 top-k targets computed by the dump",
        "kl": {f"{t:g}": {"mean": float(total[j, 0] / rows), "max": float(per_unit[:, j, 1].max())}
               for j, t in enumerate(schema.temperatures)},
        "top1_agreement": float(total[:, 3].min() / rows),
    }
