"""Train a student from one or more stores -- the teacher is never built or imported.

A torchtune-style recipe, no Trainer hierarchy: :func:`softlabels.train_setup.setup` resolves
a :class:`TrainConfig` (steps 1-3), the loop here reads top to bottom (4-5):

1. open the stores; each store says which split of the dataset it was dumped from
   (``schema.dataset.split``), so ``--store train.zarr --store transfer.zarr`` trains on the
   labelled train split *and* the unlabeled transfer split, each joined to its own store;
2. load those splits and check each against its store (:mod:`softlabels.data`);
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

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softlabels.checkpoint import CHECKPOINT, resume_run, save_checkpoint
from softlabels.data.provenance import json_value
from softlabels.fit import evaluate_accuracy
from softlabels.defaults import DEFAULTS
from softlabels.recipe import Precision, Recipe, build_optimizer, build_scheduler
from softlabels.student import PENULTIMATE
from softlabels.train_progress import BatchProgress
from softlabels.train_setup import Run, StudentFeatures, build_student, setup

__all__ = ["train_student", "build_student", "DEFAULTS", "StudentFeatures", "TrainConfig", "default_preload_bytes"]



@dataclass
class TrainConfig:
    """Everything a student run is given (the arguments of :func:`train_student`)."""

    store_path: str | Sequence[str] | None
    dataset_spec: str
    student_arch: str
    method: str
    out_dir: str | Path
    temperature: float | None = None
    k: int | None = None
    epochs: int = DEFAULTS["epochs"]
    seed: int = DEFAULTS["seed"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    eval_split: str | None = "auto"  # auto: test, else val; None: no evaluation
    holdout: float | None = None  # evaluate on this seeded fraction of train instead, left out of training
    hparams: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    allow_mismatch: bool | Sequence[str] = False  # kinds of dataset difference to allow (True: all)
    views: str = "first"
    student_augment: str | None = None
    num_workers: int = 0
    storage_options: dict | None = None
    recipe: Recipe = field(default_factory=Recipe)
    augment: bool = True
    student_feature_layer: str = PENULTIMATE
    preload_bytes: int = 1 << 30
    shuffle: str = "auto"
    resume: bool = False
    expect_digests: Sequence[str] | None = None  # --expect-digest, one per store (softlabels.stores.integrity)


def default_preload_bytes() -> int:
    """A quarter of the machine's RAM (1 GiB when it cannot be read): stores whose arrays are
    larger stream chunk by chunk instead of being preloaded."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


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
    eval_split: str | None = "auto",
    holdout: float | None = None,
    hparams: dict[str, Any] | None = None,
    progress: bool = True,
    allow_mismatch: bool | Sequence[str] = False,
    views: str = "first",
    student_augment: str | None = None,
    num_workers: int = 0,
    warn: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    storage_options: dict | None = None,
    recipe: Recipe | None = None,
    augment: bool = True,
    student_feature_layer: str = PENULTIMATE,
    max_preload_bytes: int | None = None,
    shuffle: str = "auto",
    resume: bool = False,
    expect_digests: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train ``student_arch`` on ``dataset_spec`` with ``method`` from the store(s) at
    ``store_path`` (a path, a list of paths -- one per split, e.g. train + transfer -- or None
    for ``ce``/``ls``). ``temperature`` must be in every store's grid (default: the method's);
    ``k`` uses the first k stored logits (default: all); ``hparams`` are the method's
    (:func:`softlabels.losses.method_defaults`). A store dumped with ``--augment`` replays its
    stored views (``views`` picks one per epoch); ``eval_split`` is evaluated every epoch ("auto":
    test, else val; a dataset with neither needs ``holdout``, a seeded fraction of the train rows
    held out of training, or ``eval_split=None``); ``student_augment`` adds a student-only
    augmentation the teacher never saw (see :mod:`softlabels.augment`). Returns the metrics also written to
    ``out_dir/metrics.json``; the student's ``state_dict`` goes to ``out_dir/student.pt``.
    ``storage_options`` are fsspec options for remote stores (``s3://``, ``http(s)://``);
    ``expect_digests`` pins each store's digest (``sha256:...``), in order.

    ``student_arch`` is any spec of :mod:`softlabels.specs` (``torchvision:resnet18``, ...).
    ``recipe`` (:class:`softlabels.recipe.Recipe`; default: Adam at ``lr``, cosine) sets the
    optimizer, schedule, warm-up, AMP, channels-last and clipping. Image datasets with raw images
    train on a random-resized crop + flip unless ``augment=False``; evaluation uses the split's
    (the dump's) preprocessing (``eval_split="auto"``: test, else val). ``student_feature_layer``
    names the student module the ``hint`` method regresses. Stores whose arrays exceed
    ``max_preload_bytes`` (default :func:`default_preload_bytes`) stream with the chunk-aware order
    (``shuffle="auto"``; or ``"full"``/``"chunks"``). Every epoch writes
    ``out_dir/checkpoint.pt``; ``resume=True`` continues from it (refused when the arguments differ).
    """
    recipe = recipe or Recipe(lr=lr)
    config = TrainConfig(
        store_path, dataset_spec, student_arch, method, out_dir, temperature=temperature, k=k, epochs=epochs,
        seed=seed, batch_size=batch_size, lr=recipe.lr, eval_split=eval_split, holdout=holdout, hparams=dict(hparams or {}),
        progress=progress, allow_mismatch=allow_mismatch, views=views, student_augment=student_augment,
        num_workers=num_workers, storage_options=storage_options, recipe=recipe, augment=augment,
        student_feature_layer=student_feature_layer,
        preload_bytes=default_preload_bytes() if max_preload_bytes is None else int(max_preload_bytes),
        shuffle=shuffle, resume=resume, expect_digests=expect_digests,
    )
    return run_training(config, warn=warn, on_epoch=on_epoch)


def run_training(
    config: TrainConfig,
    *,
    warn: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """:func:`train_student` on a :class:`TrainConfig`: setup, the loop, the outputs."""
    wall_start = time.perf_counter()
    warn = warn or _stderr_warning
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    run = setup(config, note)
    precision = Precision(config.recipe.amp, run.device)
    if config.recipe.amp and precision.dtype is None:
        note("--amp has no effect on the CPU; training in float32")
    history, stages_run, start_epoch = _train_loop(run, config, precision, on_epoch)
    return _write_outputs(run, config, history, stages_run, warnings, wall_start, precision, start_epoch)


def _run_args(run: Run, config: TrainConfig) -> dict[str, Any]:
    """The arguments a checkpoint records; a resume must give the same."""
    return json_value({
        "store": run.paths, "dataset": config.dataset_spec, "student": config.student_arch, "method": config.method,
        "hparam": config.hparams, "temperature": config.temperature, "k": config.k, "epochs": config.epochs,
        "seed": config.seed, "batch_size": config.batch_size, "views": config.views,
        "student_augment": config.student_augment, "augment": config.augment,
        "student_feature_layer": config.student_feature_layer, "eval_split": run.eval_split, "shuffle": run.shuffle,
        **config.recipe.to_dict(),
    })


def _train_loop(run: Run, config: TrainConfig, precision: Precision, on_epoch) -> tuple[list, list, int]:
    """The recipe's optimizer and per-step schedule; per epoch the mean loss and its components,
    the held-out accuracy, and a checkpoint. Returns ``(history, stages, first epoch run)``."""
    student, method, device, recipe = run.student, run.method, run.device, config.recipe
    memory_format = torch.channels_last if recipe.channels_last and len(run.input_shape) == 3 else torch.preserve_format
    student.to(device, memory_format=memory_format)
    method.to(device)
    params = [*student.parameters(), *method.parameters()]
    optimizer = build_optimizer(recipe, [student, method])
    scheduler = build_scheduler(recipe, optimizer, len(run.sampler), config.epochs)
    out_path = Path(config.out_dir)
    run_args = _run_args(run, config)
    in_process = config.num_workers == 0
    history: list[dict[str, Any]] = []
    stages_run: list[str] = []
    start_epoch, step = 0, 0
    with torch.random.fork_rng(devices=[]), BatchProgress(config.progress, config.epochs) as bar:
        torch.manual_seed(config.seed)
        if config.resume:
            info = resume_run(out_path / CHECKPOINT, run_args, model=student, loss=method, optimizer=optimizer,
                              scheduler=scheduler, scaler=precision.scaler)
            history, stages_run, start_epoch, step = info["history"], info["stages"], info["epoch"], info["step"]
        student.train()
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            run.sampler.set_epoch(epoch)
            run.train_data.set_epoch(epoch)
            bar.start_epoch(epoch, len(run.sampler))
            stage = method.stage(epoch, config.epochs)
            if not stages_run or stages_run[-1] != stage:
                stages_run.append(stage)
            total = torch.zeros((), device=device)
            parts_sum: dict[str, torch.Tensor] = {}
            seen = 0
            for item in run.batches:
                batch = run.train_data.__getitems__(item) if in_process else item
                has_labels = bool((batch["label"] >= 0).any())  # on the CPU copy: no device sync
                x = batch["input"].to(device, non_blocking=True, memory_format=memory_format)
                labels = batch["label"].to(device, non_blocking=True) if has_labels else None
                targets = {name: t.to(device, non_blocking=True) for name, t in batch["targets"].items()}
                with precision.autocast():
                    logits = student(x)
                feats = run.features.value if run.features is not None else None
                out = method(logits.float(), labels, targets, student_features=feats, stage=stage)
                precision.backward_step(out.total, optimizer, params, recipe.grad_clip)
                scheduler.step()
                step += 1
                n = x.shape[0]
                seen += n
                total += out.total.detach() * n
                for key, value in out.components.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value * n
                if bar.enabled:  # running means for the bar (a device sync; not when quiet)
                    bar.step(n, float(total) / seen, {key: float(v) / seen for key, v in parts_sum.items()})
            train_seconds = time.perf_counter() - epoch_start
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "stage": stage,
                "loss": float(total) / max(seen, 1),
                "components": {key: float(v) / max(seen, 1) for key, v in parts_sum.items()},
                "train_seconds": train_seconds,
                "images_per_second": seen / max(train_seconds, 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if run.eval_set is not None:
                record["test_accuracy"] = evaluate_accuracy(student, run.eval_set, device=device)
                record["eval_split"] = run.eval_split
            history.append(record)
            out_path.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                out_path / CHECKPOINT, model=student, loss=method, optimizer=optimizer, scheduler=scheduler,
                scaler=precision.scaler,
                info={"epoch": epoch + 1, "step": step, "sampler": {"epoch": epoch + 1, "batch": 0},
                      "args": run_args, "history": history, "stages": stages_run},
            )
            bar.end_epoch(record)
            if on_epoch is not None:
                on_epoch(record)
    if run.features is not None:
        run.features.remove()
    return history, stages_run, start_epoch


def _store_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for path, store in zip(run.paths, run.stores):
        size = store.bytes_on_disk()
        rows.append(
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
    return rows


def _write_outputs(run: Run, config: TrainConfig, history, stages_run, warnings, wall_start, precision,
                   start_epoch) -> dict[str, Any]:
    """``student.pt`` (the state dict) and ``metrics.json``; returns the metrics."""
    out_path = Path(config.out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    student, method = run.student, run.method
    torch.save({key: v.detach().cpu() for key, v in student.state_dict().items()}, out_path / "student.pt")
    store_rows = _store_rows(run)
    total_bytes = sum(r["bytes_on_disk"] for r in store_rows)
    total_rows = sum(r["num_samples"] for r in store_rows)
    effective_k = (run.k if run.k is not None else min(s.k for s in run.stores)) if run.reads_topk else None
    first_part = run.train_data.parts[0] if hasattr(run.train_data, "parts") else run.train_data
    paths = run.paths
    metrics: dict[str, Any] = {
        "method": config.method,
        "hparams": json_value(method.hparams),
        "temperature": method.temperature,
        "k": effective_k,
        "test_accuracy": history[-1].get("test_accuracy"),
        "best_test_accuracy": max((h["test_accuracy"] for h in history if "test_accuracy" in h), default=None),
        "eval_split": run.eval_split,
        "holdout": run.holdout,
        "epochs": config.epochs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.recipe.lr,
        "optimizer": config.recipe.optimizer,
        "schedule": "cosine to 0 over all steps"
        if config.recipe.schedule == "cosine" and not config.recipe.warmup_epochs else config.recipe.schedule,
        "recipe": {**config.recipe.to_dict(), "amp": precision.name, "train_transform": _transform_name(first_part),
                   "shuffle": run.shuffle, "preloaded": run.train_data.preloaded_all,
                   "max_preload_bytes": run.preload_bytes,
                   "student_feature_layer": config.student_feature_layer if run.features is not None else None,
                   "workers": config.num_workers, "resumed_from_epoch": start_epoch if config.resume else None},
        "steps": config.epochs * len(run.sampler),
        "views": config.views,
        "replayed_augmentation": [(s.schema.augmentation or {}).get("policy", "none") for s in run.stores],
        "student_augment": None if first_part.student_augment is None else first_part.student_augment.spec,
        "dataset": run.infos[0].spec,
        "train_splits": run.splits,
        "train_samples": len(run.train_data),
        "labelled_samples": sum(int(i.num_samples) for i in run.infos if i.labels is not None),
        "unlabeled_samples": sum(int(i.num_samples) for i in run.infos if i.labels is None),
        "student": config.student_arch,
        "student_parameters": int(sum(p.numel() for p in student.parameters())),
        "store_path": paths[0] if len(paths) == 1 else (paths or None),
        "stores": store_rows,
        "store_bytes_per_sample": total_bytes / total_rows if total_rows else None,
        "device": run.device.type,
        "wall_seconds": time.perf_counter() - wall_start,
        "history": history,
        "warnings": warnings,
        "allowed_mismatch": run.allowed_mismatch,
        **method.run_metrics(stages_run),
    }
    (out_path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def _transform_name(part) -> str:
    if part._policy is not None:
        return f"replayed {part._policy.name} views"
    return "eval preprocessing" if part.train_transform is None else part.train_transform.name
