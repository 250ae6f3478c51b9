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

import torch
from torch import nn

from softlabels.data import ConcatDistillDataset, DistillDataset, StoreBatchSampler, dataset_differences, make_loader
from softlabels.datasets import load_dataset
from softlabels.device import pick_device
from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fields import TOPK_INDICES, TOPK_VALUES
from softlabels.fit import check_training_args
from softlabels.losses import DistillationMethod, build_method, method_class, method_defaults
from softlabels.models import build_model, list_models
from softlabels.stores.integrity import open_checked_stores
from softlabels.stores.reader import SoftLabelStore
from softlabels.targets import check_k

if TYPE_CHECKING:
    from softlabels.train import TrainConfig

__all__ = ["Run", "setup", "build_student", "StudentFeatures"]


def build_student(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``builtin:<arch>`` (or a bare ``<arch>``) from :mod:`softlabels.models`."""
    kind, sep, arch = spec.strip().partition(":")
    if not sep:
        kind, arch = "builtin", kind
    unknown = f"unknown student spec '{spec}'; use builtin:<arch> with arch one of: {', '.join(list_models())}"
    if kind != "builtin" or not arch:
        raise SpecError(unknown)
    try:
        return build_model(arch, input_shape, num_classes)
    except SpecError:
        if arch.strip().lower() not in list_models():
            raise SpecError(unknown) from None
        raise


class StudentFeatures:
    """Captures the input of ``model.classifier`` (the penultimate feature, the student's hint
    layer) on every forward."""

    def __init__(self, model: nn.Module) -> None:
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise SpecError("the hint method needs a student whose final layer is an nn.Linear named 'classifier'")
        self.dim = head.in_features
        self.value: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


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


def _as_list(store_path: str | Sequence[str] | None) -> list[str]:
    if store_path is None:
        return []
    if isinstance(store_path, (str, Path)):
        return [str(store_path)]
    return [str(s) for s in store_path]


def _check_same_teacher(
    stores: list[SoftLabelStore], allow_mismatch: bool, warn: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Refuse stores of different teachers; with ``allow_mismatch`` warn and return the
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
                if not allow_mismatch:
                    raise SpecError(msg + "; train from stores of one teacher, or pass --allow-mismatch")
                warn(msg + "; training anyway (--allow-mismatch)")
                allowed.append(
                    {"store": other.location, "field": f"teacher.{key}", "store_value": t.get(key),
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


def _build_method(config: TrainConfig, cls, hparams, stores, student, num_classes, k):
    """The method with the store constants it declares; the student's feature hook if it reads
    features. Returns ``(method, features)``."""
    constants: dict[str, Any] = {"num_classes": num_classes}
    if "classifier_weight" in cls.store_constants and stores and stores[0].schema.classifier_dim is not None:
        constants["classifier_weight"] = torch.as_tensor(stores[0].classifier()[0])
    features = None
    layer = cls.feature_layer(hparams)
    if layer is not None:
        features = StudentFeatures(student)
        dims = dict(stores[0].schema.features)
        if layer not in dims:
            raise InvalidTargetsError(
                f"store {stores[0].location} has no feature array {layer!r} (it has: "
                f"{', '.join(dims) or 'none'}); re-dump with --feature-layer or choose another method"
            )
        constants["teacher_feature_shape"] = (dims[layer],)
        hparams.setdefault("student_feature_shape", (features.dim,))
    if "k" in method_defaults(config.method) and k is not None:
        for store in stores:  # before build_method, whose own check only knows num_classes
            check_k(k, store.k, f"store {store.location}")
        hparams.setdefault("k", k)
    return build_method(config.method, **hparams, **constants), features


def setup(config: TrainConfig, note: Callable[[str], None]) -> Run:
    """Resolve ``config`` into a :class:`Run`; ``note`` receives every warning, in order."""
    cls = method_class(config.method)  # unknown name -> SpecError listing the known methods
    check_training_args(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr)
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
    device = pick_device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = build_student(config.student_arch, tuple(infos[0].input_shape), num_classes)
        method, features = _build_method(config, cls, hparams, stores, student, num_classes, k)
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
        )
        for (dataset, info), store in zip(loaded, stores or [None])
    ]
    for part in parts:
        for message in part.warnings:
            note(message)
    for path, (dataset, info), store in zip(paths, loaded, stores):
        allowed += [{"store": path, **d.to_dict()} for d in dataset_differences(store, dataset, info)]
    train_data = parts[0] if len(parts) == 1 else ConcatDistillDataset(parts)
    shuffle = True if train_data.preloaded_all else "chunks"
    sampler = StoreBatchSampler(train_data, config.batch_size, shuffle=shuffle, seed=config.seed)
    batches: Any = sampler  # in-process: one __getitems__ per batch, no DataLoader machinery
    if config.num_workers > 0:
        batches = make_loader(train_data, sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda")

    eval_set = None
    if config.eval_split:
        eval_set, eval_info = load_dataset(config.dataset_spec, config.eval_split)
        if eval_info.labels is None:
            raise SpecError(
                f"the {config.eval_split} split of {eval_info.spec} is unlabeled; choose a labelled eval split"
            )
    return Run(paths, stores, splits, infos, student, method, features, train_data, sampler, batches, eval_set,
               device, k, reads_topk, allowed)
