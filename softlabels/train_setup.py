"""The student recipe's setup: resolve the stores, the data, the student and the method.

:func:`setup` turns a :class:`~softlabels.train.TrainConfig` into a :class:`Run` -- everything
the loop in :mod:`softlabels.train` needs -- reading what the method declares it needs from the
store (:class:`~softlabels.losses.DistillationMethod`) rather than guessing from its name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from softlabels.data.provenance import allowed_kinds
from softlabels.data import ConcatDistillDataset, DistillDataset, StoreBatchSampler, dataset_differences, make_loader
from softlabels.datasets import load_dataset
from softlabels.datasets.splits import choose_eval_split, holdout
from softlabels.distributed import DistContext
from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fields import TOPK_INDICES, TOPK_VALUES
from softlabels.fit import check_training_args
from softlabels.losses import DistillationMethod, build_method, method_class, method_defaults
from softlabels.stores.integrity import open_checked_stores
from softlabels.stores.reader import SoftLabelStore
from softlabels.student import StudentFeatures, build_student, check_student
from softlabels.targets import check_k
from softlabels.train_transforms import train_transform_for

if TYPE_CHECKING:
    from softlabels.train import TrainConfig

__all__ = ["Run", "setup", "build_student", "StudentFeatures"]  # the last two live in softlabels.student


@dataclass
class Run:
    """What the loop needs, resolved from a config."""

    paths: list[str]
    stores: list[SoftLabelStore]
    splits: list[str]
    infos: list[Any]
    student: nn.Module
    method: DistillationMethod
    features: StudentFeatures | None
    train_data: DistillDataset | ConcatDistillDataset
    sampler: StoreBatchSampler
    batches: Any  # the sampler (in-process reads) or a DataLoader over it
    eval_set: Any
    device: torch.device
    k: int | None  # the top-k the batches carry (None: all stored, or no top-k read)
    reads_topk: bool
    allowed_mismatch: list[dict[str, Any]] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    shuffle: str = "full"  # the sampler's order: full (preloaded) or chunks (streamed)
    preload_bytes: int = 0
    eval_split: str | None = None  # the split evaluated on ("holdout": a held-out part of train)
    holdout: dict[str, Any] | None = None  # fraction, seed and row counts of --holdout


def _as_list(store_path: str | Sequence[str] | None) -> list[str]:
    if store_path is None:
        return []
    if isinstance(store_path, (str, Path)):
        return [str(store_path)]
    return [str(s) for s in store_path]


def _check_same_teacher(
    stores: list[SoftLabelStore], allow_mismatch: bool | Sequence[str], warn: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Refuse stores of different teachers; with ``allow_mismatch`` (True, or kinds holding
    ``teacher``) warn and return the
    differences (for ``metrics.json``'s ``allowed_mismatch``)."""
    first = stores[0].schema.teacher
    allowed = []
    for other in stores[1:]:
        t = other.schema.teacher
        for key in ("spec", "checkpoint_sha256", "num_classes"):
            if first.get(key) != t.get(key):
                msg = (
                    f"stores {stores[0].location} and {other.location} come from different teachers "
                    f"({key}: {first.get(key)!r} vs {t.get(key)!r})"
                )
                if "teacher" not in allowed_kinds(allow_mismatch):
                    raise SpecError(msg + "; train from stores of one teacher, or pass --allow teacher")
                warn(msg + "; training anyway (--allow teacher)")
                allowed.append(
                    {"store": other.location, "field": f"teacher.{key}", "kind": "teacher", "store_value": t.get(key),
                     "run_value": first.get(key)}
                )
                break
    return allowed


def _open_stores(config: TrainConfig, cls: type[DistillationMethod], note) -> tuple[list[str], list, list[str], list]:
    """The stores, one per split, checked to come from one teacher with one class count."""
    paths = _as_list(config.store_path)
    if not paths and cls.reads_store:
        raise SpecError(
            f"method {config.method!r} reads teacher targets from a store; pass --store (a `softlabels dump` output)"
        )
    stores = open_checked_stores(paths, storage_options=config.storage_options, expect_digests=config.expect_digests)
    splits = [str(s.schema.dataset.get("split", "train")) for s in stores] or ["train"]
    if len(set(splits)) != len(splits):
        raise SpecError(f"two stores cover the same split ({', '.join(splits)}); pass one store per split")
    allowed: list[dict[str, Any]] = []
    if stores:
        allowed += _check_same_teacher(stores, config.allow_mismatch, note)
        classes = {s.num_classes for s in stores}
        if len(classes) > 1:
            raise SpecError(f"the stores have different numbers of classes: {sorted(classes)}")
    return paths, stores, splits, allowed


def feature_stats(store: SoftLabelStore, layer: str) -> tuple[float, float]:
    """(mean, rms) of every stored value of ``features/<layer>``: the store's summary (format
    1.2), else computed here chunk by chunk (older stores)."""
    recorded = ((store.meta.summary or {}).get("features") or {}).get(layer)
    if recorded is not None:
        return float(recorded["mean"]), float(recorded["rms"])
    array = store.array(f"features/{layer}")
    total = squares = count = 0.0
    step = max(1, store.schema.rows_per_chunk)
    for start in range(0, store.num_samples, step):
        block = np.asarray(array[start : start + step], dtype=np.float64)
        total, squares, count = total + block.sum(), squares + np.square(block).sum(), count + block.size
    return total / max(count, 1), float(np.sqrt(squares / max(count, 1)))


def _build_method(config: TrainConfig, cls, hparams, stores, student, num_classes, k, input_shape):
    """The method with the store constants it declares; the student's feature hook if it reads
    features. Returns ``(method, features)``."""
    constants: dict[str, Any] = {"num_classes": num_classes}
    if "classifier_weight" in cls.store_constants and stores and stores[0].schema.classifier_dim is not None:
        constants["classifier_weight"] = torch.as_tensor(stores[0].classifier()[0])
    features = None
    layer = cls.feature_layer(hparams)
    if layer is not None:
        features = StudentFeatures(student, config.student_feature_layer)
        dims = dict(stores[0].schema.features)
        if layer not in dims:
            raise InvalidTargetsError(
                f"store {stores[0].location} has no feature array {layer!r} (it has: "
                f"{', '.join(dims) or 'none'}); re-dump with --feature-layer or choose another method"
            )
        constants["teacher_feature_shape"] = (dims[layer],)
        if "teacher_feature_stats" in cls.store_constants:
            constants["teacher_feature_stats"] = feature_stats(stores[0], layer)
        hparams.setdefault("student_feature_shape", features.probe(student, input_shape))
    if "k" in method_defaults(config.method) and k is not None:
        for store in stores:  # before build_method, whose own check only knows num_classes
            check_k(k, store.k, f"store {store.location}")
        hparams.setdefault("k", k)
    return build_method(config.method, **hparams, **constants), features


def setup(config: TrainConfig, note: Callable[[str], None], ctx: DistContext | None = None) -> Run:
    """Resolve ``config`` into a :class:`Run`; ``note`` receives every warning, in order. Under
    torchrun (``ctx``) the device is the rank's and the sampler yields the rank's share."""
    ctx = ctx or DistContext()
    cls = method_class(config.method)  # unknown name -> SpecError listing the known methods
    check_training_args(epochs=config.epochs, batch_size=config.batch_size, lr=config.recipe.lr)
    if config.shuffle not in ("auto", "full", "chunks"):
        raise SpecError(f"shuffle must be auto, full or chunks, got {config.shuffle!r}")
    hparams = dict(config.hparams or {})
    k = config.k
    if config.temperature is not None:
        if "temperature" in method_defaults(config.method):
            hparams["temperature"] = float(config.temperature)
        else:
            note(f"method {config.method!r} uses no temperature; ignoring --temperature {config.temperature:g}")

    # stores, one per split; each split of the dataset joined to its store
    paths, stores, splits, allowed = _open_stores(config, cls, note)
    loaded = [load_dataset(config.dataset_spec, split) for split in splits]
    infos = [info for _, info in loaded]
    if len({tuple(i.input_shape) for i in infos}) > 1:
        raise SpecError(f"splits {splits} have different input shapes")
    num_classes = stores[0].num_classes if stores else infos[0].num_classes
    unlabeled = [(path, info.split) for path, info in zip(paths, infos) if info.labels is None]
    if not stores and infos[0].labels is None:
        raise SpecError(f"the {infos[0].split} split of {infos[0].spec} is unlabeled; {config.method} needs labels")

    # student and method, initialised from the seed
    device = ctx.device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        input_shape = tuple(infos[0].input_shape)
        student = build_student(config.student_arch, input_shape, num_classes)
        check_student(student, config.student_arch, input_shape, num_classes)
        method, features = _build_method(config, cls, hparams, stores, student, num_classes, k, input_shape)
    if method.requires_labels and unlabeled:
        path, split = unlabeled[0]
        raise InvalidTargetsError(
            f"method {config.method!r} needs ground-truth labels but store {path} covers the unlabeled {split!r} "
            "split; use kd or kd-topk (no labels needed) or drop that store"
        )
    reads_topk = bool({TOPK_VALUES, TOPK_INDICES} & method.needs)
    if k is not None and not reads_topk:
        note(f"method {config.method!r} reads no top-k logits; ignoring --k {k}")
        k = None
    if reads_topk and k is None and len({s.k for s in stores}) > 1:
        k = min(s.k for s in stores)
        note(f"the stores hold different top-k ({sorted({s.k for s in stores})}); using the first k={k} of each")

    # the training data: each split's rows with the method's targets
    parts = [
        DistillDataset.for_method(
            dataset, store, method, info=info, k=k, views=config.views, seed=config.seed,
            allow_mismatch=config.allow_mismatch, student_augment=config.student_augment,
            preload_bytes=config.preload_bytes,
            train_transform=train_transform_for(dataset, input_shape, config.augment, info),
        )
        for (dataset, info), store in zip(loaded, stores or [None])
    ]
    for part in parts:
        for message in part.warnings:
            note(message)
    for path, (dataset, info), store in zip(paths, loaded, stores):
        allowed += [{"store": path, **d.to_dict()} for d in dataset_differences(store, dataset, info)]
    train_data = parts[0] if len(parts) == 1 else ConcatDistillDataset(parts)
    if config.views in ("next", "random") and stores and all(s.views == 1 for s in stores):
        raise SpecError(
            f"--views {config.views} picks one of several stored views per epoch, but {', '.join(paths)} "
            "hold one view per sample; dump with --views V --augment POLICY, or drop --views"
        )
    eval_split = None  # None and no --holdout: no evaluation
    if config.eval_split is not None or config.holdout is not None:
        eval_split = choose_eval_split(config.dataset_spec, splits[0], _requested(config.eval_split), config.holdout)
    eval_set, exclude, held = None, None, None
    if eval_split is None and config.holdout is not None:  # a seeded part of the train rows, left out of training
        if "train" not in splits:
            raise SpecError(f"--holdout holds out part of the train split, but the stores cover {', '.join(splits)}")
        part = splits.index("train")
        held = holdout(loaded[part][0], config.holdout, config.seed)
        offset = sum(len(p) for p in parts[:part])
        eval_set, exclude, eval_split = held.held_out, held.held_out_index + offset, "holdout"
    shuffle = config.shuffle
    if shuffle == "auto":
        shuffle = "full" if train_data.preloaded_all else "chunks"
    if config.batch_size > len(train_data):
        raise SpecError(
            f"--batch-size {config.batch_size} is larger than the {len(train_data)} training samples; "
            f"use --batch-size <= {len(train_data)}"
        )
    sampler = StoreBatchSampler(train_data, config.batch_size, shuffle=True if shuffle == "full" else "chunks",
                                seed=config.seed, exclude=exclude, rank=ctx.rank, world_size=ctx.world_size)
    batches: Any = sampler  # in-process: one __getitems__ per batch, no DataLoader machinery
    if config.num_workers > 0:
        batches = make_loader(train_data, sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda")

    if eval_split is not None and eval_set is None:
        eval_set, eval_info = load_dataset(config.dataset_spec, eval_split)
        if eval_info.labels is None:
            raise SpecError(
                f"the {eval_split} split of {eval_info.spec} is unlabeled; choose a labelled eval split"
            )
    return Run(paths, stores, splits, infos, student, method, features, train_data, sampler, batches, eval_set,
               device, k, reads_topk, allowed, input_shape, shuffle, config.preload_bytes, eval_split,
               None if held is None else held.to_dict())


def _requested(eval_split: str | None) -> str | None:
    """The split asked for; None for "auto" (test, else val)."""
    if eval_split is None or eval_split.strip().lower() == "auto":
        return None
    return eval_split
