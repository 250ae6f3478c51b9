"""Train a student from one or more stores -- the teacher is never built or imported.

One readable function, top to bottom (a torchtune-style recipe, no Trainer hierarchy):

1. open the stores; each store says which split of the dataset it was dumped from
   (``schema.dataset.split``), so ``--store train.zarr --store transfer.zarr`` trains on the
   labelled train split *and* the unlabeled transfer split, each joined to its own store;
2. load those splits and check each against its store (:mod:`softlabels.distill_data`);
3. build the student and the method (:func:`softlabels.losses.build_method`) with the store's
   constants (classes, teacher classifier weight, feature width);
4. Adam with a cosine decay to zero; every step reads the batch's targets with one vectorised
   store read, computes ``method(logits, labels, targets, student_features=..., stage=...)``;
5. evaluate on the held-out split every epoch; write ``student.pt`` and ``metrics.json``.

``ce`` and ``ls`` need no store (``store_path=None`` trains on the ``train`` split). Rows of an
unlabeled split carry label -1: CE terms average over the labelled rows of a batch, a batch
without labels drops the CE term (pure KD), and methods that need labels refuse unlabeled
stores up front. Deterministic given ``seed`` on CPU; CUDA with bf16 autocast when available.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softlabels.datasets import load_dataset
from softlabels.distill_data import ConcatDistillDataset, DistillDataset, StoreBatchSampler, make_loader
from softlabels.distill_data import dataset_differences
from softlabels.errors import InvalidTargetsError, SpecError
from softlabels.fit import check_training_args
from softlabels.losses import build_method, method_class, method_defaults
from softlabels.models import build_model, list_models
from softlabels.stores import format as fmt
from softlabels.stores.integrity import open_checked_stores
from softlabels.stores.reader import SoftLabelStore

__all__ = ["train_student", "build_student", "DEFAULTS", "StudentFeatures"]

#: Trainer defaults (the method hyperparameters default to softlabels.losses', see LOSSES.md).
DEFAULTS = {"epochs": 60, "seed": 0, "batch_size": 128, "lr": 1e-2, "optimizer": "adam", "schedule": "cosine"}

_TOPK = frozenset({fmt.TOPK_VALUES, fmt.TOPK_INDICES})


# --------------------------------------------------------------------------------------
# Small helpers the recipe uses
# --------------------------------------------------------------------------------------
def build_student(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``builtin:<arch>`` (or a bare ``<arch>``) from :mod:`softlabels.models`."""
    kind, sep, arch = spec.strip().partition(":")
    if not sep:
        kind, arch = "builtin", kind
    if kind != "builtin" or not arch:
        raise SpecError(f"unknown student spec '{spec}'; use builtin:<arch> with arch one of: {', '.join(list_models())}")
    try:
        return build_model(arch, input_shape, num_classes)
    except SpecError as exc:
        if arch.strip().lower() not in list_models():
            raise SpecError(
                f"unknown student spec '{spec}'; use builtin:<arch> with arch one of: {', '.join(list_models())}"
            ) from None
        raise exc


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


def _needs_store(method: str) -> bool:
    defaults = method_defaults(method)
    return bool(method_class(method).needs) or any(
        key in defaults for key in ("temperature", "classifier_weight", "teacher_feature_shape")
    )


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


def _eval_batches(dataset: Any, batch_size: int = 1024):
    """``(x, y)`` batches of a held-out split: tensor slices for in-memory datasets, else a DataLoader."""
    inputs, targets = getattr(dataset, "inputs", None), getattr(dataset, "targets", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        for start in range(0, inputs.shape[0], batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
        return
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=256):
        yield x, torch.as_tensor(y, dtype=torch.int64)


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: Any, device: torch.device, autocast) -> float:
    model.eval()
    correct = total = 0
    for x, y in _eval_batches(dataset):
        with autocast():
            pred = model(x.to(device, non_blocking=True)).argmax(dim=-1).cpu()
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    model.train()
    return correct / max(total, 1)


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------
def train_student(
    store_path: str | Sequence[str] | None,
    dataset_spec: str,
    student_arch: str,
    method: str,
    *,
    temperature: float | None = None,
    k: int | None = None,
    epochs: int = DEFAULTS["epochs"],
    seed: int = DEFAULTS["seed"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    out_dir: str | Path,
    eval_split: str | None = "test",
    hparams: dict[str, Any] | None = None,
    progress: bool = True,
    allow_mismatch: bool = False,
    views: str = "first",
    student_augment: str | None = None,
    num_workers: int = 0,
    warn: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    storage_options: dict | None = None,
    expect_digests: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train ``student_arch`` on ``dataset_spec`` with ``method`` from the store(s) at
    ``store_path`` (a path, a list of paths -- one per split, e.g. train + transfer -- or None
    for ``ce``/``ls``). ``temperature`` must be in every store's grid (default: the method's);
    ``k`` uses the first k stored logits (default: all); ``hparams`` are the method's
    (:func:`softlabels.losses.method_defaults`). A store dumped with ``--augment`` replays its
    stored views (``views`` picks one per epoch); ``student_augment`` adds a student-only
    augmentation the teacher never saw (see :mod:`softlabels.augment`). Returns the metrics also written to
    ``out_dir/metrics.json``; the student's ``state_dict`` goes to ``out_dir/student.pt``.
    ``storage_options`` are fsspec options for remote stores (``s3://``, ``http(s)://``).
    """
    wall_start = time.perf_counter()
    warn = warn or _stderr_warning
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    # -- 0. arguments ------------------------------------------------------------------
    method_class(method)  # unknown name -> SpecError listing the known methods
    check_training_args(epochs=epochs, batch_size=batch_size, lr=lr)
    hparams = dict(hparams or {})
    accepted = method_defaults(method)
    if temperature is not None:
        if "temperature" in accepted:
            hparams["temperature"] = float(temperature)
        else:
            note(f"method {method!r} uses no temperature; ignoring --temperature {temperature:g}")
            temperature = None

    # -- 1. stores: one per split ------------------------------------------------------
    paths = _as_list(store_path)
    allowed_mismatch: list[dict[str, Any]] = []  # differences --allow-mismatch let through
    if not paths and _needs_store(method):
        raise SpecError(f"method {method!r} reads teacher targets from a store; pass --store (a `softlabels dump` output)")
    stores = open_checked_stores(paths, storage_options=storage_options, expect_digests=expect_digests)
    splits = [str(s.schema.dataset.get("split", "train")) for s in stores] or ["train"]
    if len(set(splits)) != len(splits):
        raise SpecError(f"two stores cover the same split ({', '.join(splits)}); pass one store per split")
    if stores:
        allowed_mismatch += _check_same_teacher(stores, allow_mismatch, note)
        classes = {s.num_classes for s in stores}
        if len(classes) > 1:
            raise SpecError(f"the stores have different numbers of classes: {sorted(classes)}")

    # -- 2. data: each split joined to its store ---------------------------------------
    loaded = [load_dataset(dataset_spec, split) for split in splits]
    infos = [info for _, info in loaded]
    if len({tuple(i.input_shape) for i in infos}) > 1:
        raise SpecError(f"splits {splits} have different input shapes")
    num_classes = stores[0].num_classes if stores else infos[0].num_classes
    input_shape = tuple(infos[0].input_shape)
    unlabeled = [(path, info.split) for path, info in zip(paths, infos) if info.labels is None]
    if not stores and infos[0].labels is None:
        raise SpecError(f"the {infos[0].split} split of {infos[0].spec} is unlabeled; {method} needs labels")

    # -- 3. student and method -----------------------------------------------------------
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_student(student_arch, input_shape, num_classes)
        constants: dict[str, Any] = {"num_classes": num_classes}
        if stores and stores[0].schema.classifier_dim is not None:
            constants["classifier_weight"] = torch.as_tensor(stores[0].classifier()[0])
        hint = None
        if "teacher_feature_shape" in accepted:
            hint = StudentFeatures(student)
            feature = str(hparams.get("feature", accepted.get("feature") or "penultimate"))
            name = feature.removeprefix(fmt.FEATURES_PREFIX)
            dims = dict(stores[0].schema.features)
            if name not in dims:
                raise InvalidTargetsError(
                    f"store {stores[0].location} has no feature array {name!r} (it has: "
                    f"{', '.join(dims) or 'none'}); re-dump with --feature-layer or choose another method"
                )
            constants["teacher_feature_shape"] = (dims[name],)
            hparams.setdefault("student_feature_shape", (hint.dim,))
        if "k" in accepted and k is not None:
            for store in stores:  # before build_method, whose own check only knows num_classes
                if k > store.k:
                    raise InvalidTargetsError(
                        f"k={k} but store {store.location} only holds the top-{store.k} logits; use --k <= "
                        f"{store.k} or re-dump with --k {k}"
                    )
            hparams.setdefault("k", k)
        loss_fn = build_method(method, **hparams, **constants)
    if loss_fn.requires_labels and unlabeled:
        path, split = unlabeled[0]
        raise InvalidTargetsError(
            f"method {method!r} needs ground-truth labels but store {path} covers the unlabeled {split!r} split; "
            "use kd or kd-topk (no labels needed) or drop that store"
        )
    reads_topk = bool(_TOPK & loss_fn.needs)
    if k is not None and not reads_topk:
        note(f"method {method!r} reads no top-k logits; ignoring --k {k}")
        k = None
    if reads_topk and k is None and len({s.k for s in stores}) > 1:
        k = min(s.k for s in stores)
        note(f"the stores hold different top-k ({sorted({s.k for s in stores})}); using the first k={k} of each")
    parts = [
        DistillDataset.for_method(
            dataset, store, loss_fn, info=info, k=k, views=views, seed=seed, allow_mismatch=allow_mismatch,
            student_augment=student_augment,
        )
        for (dataset, info), store in zip(loaded, stores or [None])
    ]
    for part in parts:
        for message in part.warnings:
            note(message)
    for path, (dataset, info), store in zip(paths, loaded, stores):
        allowed_mismatch += [{"store": path, **d.to_dict()} for d in dataset_differences(store, dataset, info)]
    train_data = parts[0] if len(parts) == 1 else ConcatDistillDataset(parts)
    sampler = StoreBatchSampler(
        train_data, batch_size, shuffle=True if train_data.preloaded_all else "chunks", seed=seed
    )
    batches: Any = sampler  # in-process: one __getitems__ per batch, no DataLoader machinery
    if num_workers > 0:
        batches = make_loader(train_data, sampler, num_workers=num_workers, pin_memory=device.type == "cuda")

    eval_set = None
    if eval_split:
        eval_set, eval_info = load_dataset(dataset_spec, eval_split)
        if eval_info.labels is None:
            raise SpecError(f"the {eval_split} split of {eval_info.spec} is unlabeled; choose a labelled eval split")

    student.to(device)
    loss_fn.to(device)
    params = [*student.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(sampler)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    # -- 4. the loop -------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    stages_run: list[str] = []
    with torch.random.fork_rng(devices=[]), _Progress(progress, epochs) as bar:
        torch.manual_seed(seed)
        student.train()
        for epoch in range(epochs):
            epoch_start = time.perf_counter()
            sampler.set_epoch(epoch)
            train_data.set_epoch(epoch)
            stage = loss_fn.stage(epoch, epochs)
            if not stages_run or stages_run[-1] != stage:
                stages_run.append(stage)
            total = torch.zeros((), device=device)
            parts_sum: dict[str, torch.Tensor] = {}
            seen = 0
            for item in batches:
                batch = item if num_workers > 0 else train_data.__getitems__(item)
                has_labels = bool((batch["label"] >= 0).any())  # on the CPU copy: no device sync
                x = batch["input"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True) if has_labels else None
                targets = {name: t.to(device, non_blocking=True) for name, t in batch["targets"].items()}
                with autocast():
                    logits = student(x)
                feats = hint.value if hint is not None else None
                out = loss_fn(logits.float(), labels, targets, student_features=feats, stage=stage)
                optimizer.zero_grad(set_to_none=True)
                out.total.backward()
                optimizer.step()
                scheduler.step()
                n = x.shape[0]
                seen += n
                total += out.total.detach() * n
                for key, value in out.components.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value * n
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "stage": stage,
                "loss": float(total) / max(seen, 1),
                "components": {key: float(v) / max(seen, 1) for key, v in parts_sum.items()},
                "train_seconds": time.perf_counter() - epoch_start,
            }
            if eval_set is not None:
                record["test_accuracy"] = _accuracy(student, eval_set, device, autocast)
            history.append(record)
            bar.update(record)
            if on_epoch is not None:
                on_epoch(record)
    if hint is not None:
        hint.remove()

    # -- 5. outputs --------------------------------------------------------------------
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    torch.save({key: v.detach().cpu() for key, v in student.state_dict().items()}, out_path / "student.pt")
    store_rows = []
    for path, store in zip(paths, stores):
        size = store.bytes_on_disk()
        store_rows.append(
            {
                "path": path,
                "split": store.schema.dataset.get("split"),
                "num_samples": store.num_samples,
                "labeled": store.labeled,
                "k": store.k,
                "temperatures": list(store.temperatures),
                "views": store.views,
                "bytes_on_disk": size,
                "bytes_per_sample": size / store.num_samples,
                "teacher": store.schema.teacher.get("spec"),
                "teacher_top1_accuracy": (store.meta.summary or {}).get("teacher_top1_accuracy"),
            }
        )
    total_bytes = sum(r["bytes_on_disk"] for r in store_rows)
    total_rows = sum(r["num_samples"] for r in store_rows)
    effective_k = (k if k is not None else min(s.k for s in stores)) if reads_topk else None
    final = history[-1]
    metrics: dict[str, Any] = {
        "method": method,
        "hparams": _jsonable(loss_fn.hparams),
        "temperature": loss_fn.temperature,
        "k": effective_k,
        "test_accuracy": final.get("test_accuracy"),
        "best_test_accuracy": max((h["test_accuracy"] for h in history if "test_accuracy" in h), default=None),
        "eval_split": eval_split,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": "adam",
        "schedule": "cosine to 0 over all steps",
        "steps": steps,
        "views": views,
        "replayed_augmentation": [(s.schema.augmentation or {}).get("policy", "none") for s in stores],
        "student_augment": None if parts[0].student_augment is None else parts[0].student_augment.spec,
        "dataset": infos[0].spec,
        "train_splits": splits,
        "train_samples": len(train_data),
        "labelled_samples": sum(int(i.num_samples) for i in infos if i.labels is not None),
        "unlabeled_samples": sum(int(i.num_samples) for i in infos if i.labels is None),
        "student": student_arch,
        "student_parameters": int(sum(p.numel() for p in student.parameters())),
        "store_path": paths[0] if len(paths) == 1 else (paths or None),
        "stores": store_rows,
        "store_bytes_per_sample": total_bytes / total_rows if total_rows else None,
        "device": device.type,
        "wall_seconds": time.perf_counter() - wall_start,
        "history": history,
        "warnings": warnings,
        "allowed_mismatch": allowed_mismatch,
    }
    if method == "hint":
        metrics["hint_mode"] = loss_fn.hparams.get("mode")
        metrics["hint_stages"] = stages_run
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


class _Progress:
    """Rich progress on stderr: epoch, loss, test accuracy. A no-op when disabled."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs, self.bar = enabled, epochs, None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]train[/] epoch"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  test acc {task.fields[acc]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.epochs, loss="-", acc="-")
        return self

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            acc = record.get("test_accuracy")
            self.bar.update(
                self.task,
                completed=record["epoch"],
                loss=f"{record['loss']:.4f}",
                acc="-" if acc is None else f"{100 * acc:.2f}%",
            )

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

