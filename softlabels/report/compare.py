"""Agreement between two stores over the same dataset: two teachers, or one teacher stored two
ways (fp16 vs a compact codec, k = 10 vs k = 3). One pass over both stores, row-aligned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from softlabels.errors import SchemaMismatchError
from softlabels.report.stats import as_tensors, blocks, lse_column, one_torch_thread, sparse_kl, sparse_targets
from softlabels.stores import SoftLabelStore
from softlabels.stores import format as fmt

_NAMES = [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP]


@dataclass
class Agreement:
    """How far store ``b`` is from store ``a`` (the reference), over ``targets`` row-aligned pairs."""

    a: str
    b: str
    temperature: float
    views: str  # which views were compared
    targets: int
    top1_agree: int
    kl_ab_sum: float
    kl_ba_sum: float

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / max(self.targets, 1)

    @property
    def kl_ab(self) -> float:
        """Mean KL(a || b) of the two stores' KD-topk distributions at ``temperature``."""
        return self.kl_ab_sum / max(self.targets, 1)

    @property
    def kl_ba(self) -> float:
        return self.kl_ba_sum / max(self.targets, 1)


def dataset_key(store: SoftLabelStore) -> tuple[str, str]:
    ds = store.schema.dataset
    return str(ds.get("spec", "?")), str(ds.get("split", "?"))


def check_same_dataset(stores: Sequence[SoftLabelStore]) -> None:
    """Refuse stores over different datasets, naming the first mismatch. Stores over different
    splits of one dataset (train and transfer) may be reported together; they are not compared."""
    first = stores[0]
    for other in stores[1:]:
        a, b = first.schema, other.schema
        checks = [("dataset", a.dataset.get("spec"), b.dataset.get("spec")), ("classes", a.num_classes, b.num_classes)]
        if a.dataset.get("split") == b.dataset.get("split"):
            checks += [("samples", a.num_samples, b.num_samples),
                       ("labels sha256", a.dataset.get("labels_sha256"), b.dataset.get("labels_sha256"))]
        for what, va, vb in checks:
            if va is not None and vb is not None and va != vb:
                raise SchemaMismatchError(
                    f"stores {first.location} and {other.location} cover different datasets ({what}: {va!r} vs "
                    f"{vb!r}); report stores of one dataset together, or run `softlabels report` once per dataset"
                )


def comparable_pairs(stores: Sequence[SoftLabelStore]) -> list[tuple[int, int]]:
    """(reference, other) pairs of stores over the same dataset and split: each against the first
    store of its split."""
    first: dict[tuple[str, str], int] = {}
    pairs = []
    for i, store in enumerate(stores):
        key = dataset_key(store)
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs


def compare_stores(a: SoftLabelStore, b: SoftLabelStore, temperature: float) -> Agreement:
    """Top-1 agreement and mean KL both ways between row-aligned targets (their KD-topk
    distributions at ``temperature``, compared in sparse form). All views when both
    stores hold the same views (same count and augmentation record), else view 0 of each."""
    same_views = a.views == b.views and (a.schema.augmentation or None) == (b.schema.augmentation or None)
    views = slice(None) if same_views else slice(0, 1)
    c, t = a.num_classes, float(temperature)
    agree, kl_ab, kl_ba, n = 0, 0.0, 0.0, 0
    with torch.no_grad(), one_torch_thread():
        for raw_a, raw_b in zip(blocks(a, _NAMES, _rows(a, b)), blocks(b, _NAMES, _rows(a, b))):
            ta, tb = as_tensors(raw_a), as_tensors(raw_b)
            va, ia = (ta[name][:, views].flatten(0, 1) for name in _NAMES[:2])
            vb, ib = (tb[name][:, views].flatten(0, 1) for name in _NAMES[:2])
            la = lse_column(ta[fmt.LOGSUMEXP][:, views].flatten(0, 1), a.temperatures, t)
            lb = lse_column(tb[fmt.LOGSUMEXP][:, views].flatten(0, 1), b.temperatures, t)
            n += ia.shape[0]
            agree += int((ia[:, 0] == ib[:, 0]).sum())
            (pa, xa, fa), (pb, xb, fb) = sparse_targets(va, ia, la, t, c), sparse_targets(vb, ib, lb, t, c)
            kl_ab += float(sparse_kl(pa, xa, fa, pb, xb, fb, c).double().sum())
            kl_ba += float(sparse_kl(pb, xb, fb, pa, xa, fa, c).double().sum())
    label = "all" if same_views and a.views > 1 else ("view 0" if max(a.views, b.views) > 1 else "all")
    return Agreement(a.location, b.location, t, label, n, agree, kl_ab, kl_ba)


def _rows(a: SoftLabelStore, b: SoftLabelStore) -> int:
    """A block size that is whole chunks of both stores, so the two block streams stay aligned."""
    ca, cb = a.schema.rows_per_chunk, b.schema.rows_per_chunk
    return int(np.lcm(ca, cb)) * max(1, (1 << 16) // int(np.lcm(ca, cb)))
