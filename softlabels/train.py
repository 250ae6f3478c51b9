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
from softlabels.errors import Interrupted
from softlabels.fit import evaluate_accuracy
from softlabels.defaults import DEFAULTS
from softlabels.distributed import DEFAULT_TIMEOUT, DistContext, TrainStep, init_distributed
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
    dist_timeout: float = DEFAULT_TIMEOUT  # torchrun: seconds a rank waits in a collective


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
    dist_timeout: float = DEFAULT_TIMEOUT,
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

    Under ``torchrun`` every rank calls this: ``batch_size`` is per rank, each rank trains on
    its share of the epoch order in DistributedDataParallel, and rank 0 alone evaluates and
    writes the outputs (the other ranks return ``{"rank": r, ...}``); a collective waits at most
    ``dist_timeout`` seconds (:mod:`softlabels.distributed`).
    """
    recipe = recipe or Recipe(lr=lr)
    config = TrainConfig(
        store_path, dataset_spec, student_arch, method, out_dir, temperature=temperature, k=k, epochs=epochs,
        seed=seed, batch_size=batch_size, lr=recipe.lr, eval_split=eval_split, holdout=holdout, hparams=dict(hparams or {}),
        progress=progress, allow_mismatch=allow_mismatch, views=views, student_augment=student_augment,
        num_workers=num_workers, storage_options=storage_options, recipe=recipe, augment=augment,
        student_feature_layer=student_feature_layer,
        preload_bytes=default_preload_bytes() if max_preload_bytes is None else int(max_preload_bytes),
        shuffle=shuffle, resume=resume, expect_digests=expect_digests, dist_timeout=dist_timeout,
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
    ctx = init_distributed(config.dist_timeout)

    def note(message: str) -> None:
        warnings.append(message)
        if ctx.is_main:  # one copy of each warning, not one per rank
            warn(message)

    try:
        run = setup(config, note, ctx)
        precision = Precision(config.recipe.amp, run.device)
        if config.recipe.amp and precision.dtype is None:
            note("--amp has no effect on the CPU; training in float32")
        if ctx.distributed and ctx.is_main:
            sys.stderr.write(
                f"distributed: {ctx.world_size} ranks ({ctx.backend}, {run.device.type}), --batch-size "
                f"{config.batch_size} per rank, global batch {config.batch_size * ctx.world_size}\n"
            )
        history, stages_run, start_epoch = _train_loop(run, config, precision, on_epoch, ctx)
        if not ctx.is_main:
            ctx.barrier()  # rank 0 writes the outputs
            return {"rank": ctx.rank, "world_size": ctx.world_size, "history": history}
        metrics = _write_outputs(run, config, history, stages_run, warnings, wall_start, precision, start_epoch, ctx)
        ctx.barrier()
        return metrics
    except Interrupted as exc:
        raise ctx.stopped(exc) from None
    finally:
        ctx.close()


def _run_args(run: Run, config: TrainConfig, ctx: DistContext) -> dict[str, Any]:
    """The arguments a checkpoint records; a resume must give the same (and, under torchrun,
    the same number of ranks: the per-rank shares and the steps per epoch depend on it)."""
    ranks = {"world_size": ctx.world_size} if ctx.world_size > 1 else {}
    return json_value({**ranks,
        "store": run.paths, "dataset": config.dataset_spec, "student": config.student_arch, "method": config.method,
        "hparam": config.hparams, "temperature": config.temperature, "k": config.k, "epochs": config.epochs,
        "seed": config.seed, "batch_size": config.batch_size, "views": config.views,
        "student_augment": config.student_augment, "augment": config.augment,
        "student_feature_layer": config.student_feature_layer, "eval_split": run.eval_split, "shuffle": run.shuffle,
        **config.recipe.to_dict(),
    })


def _train_loop(run: Run, config: TrainConfig, precision: Precision, on_epoch, ctx: DistContext) -> tuple[list, list, int]:
    """The recipe's optimizer and per-step schedule; per epoch the mean loss and its components,
    the held-out accuracy, and a checkpoint. Returns ``(history, stages, first epoch run)``.
    Under torchrun the student and the method train in one DistributedDataParallel; the epoch's
    sums are gathered from every rank; rank 0 evaluates and checkpoints while the others wait."""
    student, method, device, recipe = run.student, run.method, run.device, config.recipe
    memory_format = torch.channels_last if recipe.channels_last and len(run.input_shape) == 3 else torch.preserve_format
    student.to(device, memory_format=memory_format)
    method.to(device)
    step_module = TrainStep(student, method, run.features, precision)
    # a staged method (hint two-stage) leaves the classifier or the regressor without a gradient in a stage
    model = ctx.wrap(step_module, device, find_unused_parameters=len(method.stages) > 1)
    params = [*student.parameters(), *method.parameters()]
    optimizer = build_optimizer(recipe, [student, method])
    scheduler = build_scheduler(recipe, optimizer, len(run.sampler), config.epochs)
    out_path = Path(config.out_dir)
    run_args = _run_args(run, config, ctx)
    in_process = config.num_workers == 0
    history: list[dict[str, Any]] = []
    stages_run: list[str] = []
    start_epoch, step = 0, 0
    with torch.random.fork_rng(devices=[]), BatchProgress(config.progress and ctx.is_main, config.epochs) as bar:
        torch.manual_seed(config.seed + ctx.rank)  # rank 0: the single-process stream; others: their own (dropout)
        if config.resume:  # every rank loads the same checkpoint: weights, optimizer, schedule, epoch
            info = resume_run(out_path / CHECKPOINT, run_args, model=student, loss=method, optimizer=optimizer,
                              scheduler=scheduler, scaler=precision.scaler)
            history, stages_run, start_epoch, step = info["history"], info["stages"], info["epoch"], info["step"]
            if ctx.rank:
                torch.manual_seed(config.seed * 1_000_003 + ctx.rank * 7919 + step)
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
                loss, components = ctx.collective(model, x, labels, targets, stage)
                # the gradient all-reduce runs inside backward (DistributedDataParallel)
                ctx.collective(precision.backward_step, loss, optimizer, params, recipe.grad_clip)
                scheduler.step()
                step += 1
                n = x.shape[0]
                seen += n
                total += loss.detach() * n
                for key, value in components.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + value * n
                if bar.enabled:  # running means for the bar (a device sync; not when quiet)
                    bar.step(n, float(total) / seen, {key: float(v) / seen for key, v in parts_sum.items()})
            train_seconds = time.perf_counter() - epoch_start
            loss_sum, parts, seen = ctx.epoch_sums(float(total), {k: float(v) for k, v in parts_sum.items()}, seen)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "stage": stage,
                "loss": loss_sum / max(seen, 1),
                "components": {key: v / max(seen, 1) for key, v in parts.items()},
                "train_seconds": train_seconds,
                "images_per_second": seen / max(train_seconds, 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if ctx.is_main:
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
            else:
                history.append(record)
            ctx.barrier()  # the checkpoint is complete before any rank goes on
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
                   start_epoch, ctx: DistContext) -> dict[str, Any]:
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
        "world_size": ctx.world_size,
        "global_batch_size": config.batch_size * ctx.world_size,
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
