"""The store's per-sample fields: names, axes and dtypes, listed once.

Every layer reads this list: :mod:`softlabels.stores.format` derives the array layout from it,
the writer its Zarr ``dimension_names``, the reader and :mod:`softlabels.data` their name
checks, the losses the names they read. Adding a per-sample field is one entry in
:data:`FIELDS` (plus the code that computes it in the dump). Core module: imports only the errors.

Axes (in order after ``sample``): ``view`` (V views per sample), ``rank`` (the stored top-k),
``temperature`` (the store's temperature grid). Dtypes: ``"value"`` is the store's value
dtype (float16 or float32), ``"index"`` its index dtype (uint16, or int32 past 65,536
classes); anything else is literal.
"""

from __future__ import annotations

from dataclasses import dataclass

from softlabels.errors import InvalidTargetsError

__all__ = [
    "Field",
    "FIELDS",
    "TOPK_VALUES",
    "TOPK_INDICES",
    "LOGSUMEXP",
    "LABEL_LOGIT",
    "LABELS",
    "FEATURES_PREFIX",
    "AUGMENT_PREFIX",
    "TOPK_FIELDS",
    "PT_FIELDS",
    "dimension_names",
    "check_k_range",
]

TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LOGSUMEXP = "logsumexp"
LABEL_LOGIT = "label_logit"
LABELS = "labels"
#: ``features/<layer>``: the teacher's feature rows, axes (sample, view, feature).
FEATURES_PREFIX = "features/"
#: ``augment/<param>``: a multi-view dump's explicit view parameters, axes (sample, view, ...).
AUGMENT_PREFIX = "augment/"


@dataclass(frozen=True)
class Field:
    """One per-sample array of every store: ``name``, ``axes`` (the Zarr dimension names),
    ``dtype`` (``"value"``, ``"index"`` or a numpy dtype name), ``labeled_only`` (written only
    for labelled splits)."""

    name: str
    axes: tuple[str, ...]
    dtype: str
    labeled_only: bool = False

    def shape(self, views: int, k: int, temperatures: int) -> tuple[int, ...]:
        """The per-sample shape (the axes after ``sample``)."""
        sizes = {"view": views, "rank": k, "temperature": temperatures}
        return tuple(sizes[a] for a in self.axes[1:])


#: In canonical order (the order of the arrays in ``units/sha256``); features and augmentation
#: parameters follow, per store.
FIELDS: tuple[Field, ...] = (
    Field(TOPK_VALUES, ("sample", "view", "rank"), "value"),
    Field(TOPK_INDICES, ("sample", "view", "rank"), "index"),
    Field(LOGSUMEXP, ("sample", "view", "temperature"), "float32"),
    Field(LABEL_LOGIT, ("sample", "view"), "value", labeled_only=True),
    Field(LABELS, ("sample",), "int32", labeled_only=True),
)

#: What the top-k methods read; what KD-pt reads.
TOPK_FIELDS = frozenset({TOPK_VALUES, TOPK_INDICES, LOGSUMEXP})
PT_FIELDS = frozenset({LABEL_LOGIT, LOGSUMEXP})


def dimension_names(name: str) -> tuple[str, ...] | None:
    """The Zarr ``dimension_names`` of field ``name`` (None for features/augmentation arrays)."""
    return next((f.axes for f in FIELDS if f.name == name), None)


def check_k_range(k: int, num_classes: int) -> None:
    """A store keeps the top ``k`` of ``num_classes`` logits: refuse k outside ``1..C``."""
    if not 1 <= k <= num_classes:
        raise InvalidTargetsError(
            f"k={k} is outside 1..{num_classes} (the teacher has {num_classes} classes); "
            f"pass --k between 1 and {num_classes}"
        )
