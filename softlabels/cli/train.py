"""``softlabels train``: train a student from stores, without the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from softlabels.cli.options import flag, parse_key_values, parse_storage_options, storage_option_flag
from softlabels.defaults import DEFAULTS, DIST_TIMEOUT, RECIPE_DEFAULTS



def parse_hparams(items: list[str] | None) -> dict[str, Any]:
    """``["ce_weight=0", "mode=two-stage"]`` -> ``{"ce_weight": 0, "mode": "two-stage"}``."""
    return parse_key_values(items, "--hparam", dashes_to_underscores=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        store: list[str] = typer.Option(
            None,
            "--store",
            help="Store written by `softlabels dump`. Repeat to add splits: each store trains on the split it was "
            "dumped from, e.g. --store train.zarr --store transfer.zarr (labelled + unlabeled transfer set). "
            "Optional for ce/ls.",
        ),
        dataset: str = typer.Option(
            ..., "--dataset", help="Dataset spec the stores were dumped from: mnist1d, digits, synthetic:tau=0.5, "
            "imagefolder:/data/photos?size=256&crop=224 (softlabels list datasets). The same files at another path "
            "are the same data."
        ),
        student: str = typer.Option(
            "builtin:mlp", "--student",
            help="Student spec, as --teacher: builtin:<arch> (mlp, cnn, ...), torchvision:<arch>, timm:<arch> or "
            "package.module:factory; built with the store's number of classes, never with downloaded weights "
            "(softlabels list students).",
        ),
        method: str = typer.Option(..., "--method", help="Distillation method, e.g. kd, kd-topk or hint (all, with their hyperparameters: softlabels list methods)."),
        temperature: float = typer.Option(None, "--temperature", "-T", help="One of the store's temperatures (default: the method's, 4)."),
        k: int = typer.Option(None, "--k", help="Use the first k stored top-k logits (default: all stored)."),
        epochs: int = typer.Option(DEFAULTS["epochs"], "--epochs", help="Training epochs."),
        seed: int = typer.Option(DEFAULTS["seed"], "--seed", help="Seed for initialisation, shuffling and view selection."),
        batch_size: int = typer.Option(
            DEFAULTS["batch_size"], "--batch-size", help="Batch size (per rank under torchrun: the global batch is "
            "--batch-size x the number of ranks)."
        ),
        optimizer: str = typer.Option(RECIPE_DEFAULTS["optimizer"], "--optimizer", help="sgd, adamw or adam."),
        lr: float = typer.Option(DEFAULTS["lr"], "--lr", help="Peak learning rate."),
        momentum: float = typer.Option(RECIPE_DEFAULTS["momentum"], "--momentum", help="SGD momentum."),
        weight_decay: float = typer.Option(
            RECIPE_DEFAULTS["weight_decay"], "--weight-decay", help="Weight decay (sgd: L2, adamw: decoupled), never on norms and biases."
        ),
        schedule: str = typer.Option(
            RECIPE_DEFAULTS["schedule"], "--schedule", help="Per-step learning-rate schedule after the warm-up: cosine (to 0), step or constant."
        ),
        warmup_epochs: float = typer.Option(RECIPE_DEFAULTS["warmup_epochs"], "--warmup-epochs", help="Linear warm-up from 0.01 x --lr, in epochs."),
        decay_epochs: float = typer.Option(RECIPE_DEFAULTS["decay_epochs"], "--decay-epochs", help="--schedule step: epochs between decays."),
        decay_rate: float = typer.Option(RECIPE_DEFAULTS["decay_rate"], "--decay-rate", help="--schedule step: factor per decay."),
        amp: bool = typer.Option(
            False, "--amp", help="Mixed precision on CUDA: bf16 autocast where supported, else fp16 with a grad scaler. "
            "No effect on the CPU."
        ),
        channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format for image students."),
        grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the global gradient norm to this value."),
        no_aug: bool = typer.Option(
            False, "--no-aug",
            help="Image datasets train on random views by default: imagefolder a random-resized crop + horizontal "
            "flip, cifar10/cifar100 a 4-pixel-padded random crop + flip (svhn: no flip); --no-aug trains on the eval "
            "preprocessing instead.",
        ),
        student_feature_layer: str = typer.Option(
            "penultimate", "--student-feature-layer",
            help="hint: the student module whose output regresses the stored teacher feature (maps are "
            "average-pooled); 'penultimate' is the classifier's input.",
        ),
        max_preload_bytes: int = typer.Option(
            None, "--max-preload-bytes",
            help="Preload the store arrays a run reads when they fit this budget (default: a quarter of RAM); "
            "larger stores stream chunk by chunk in a chunk-aware shuffled order.",
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from OUT/checkpoint.pt (written every epoch); the arguments must match."
        ),
        hparam: list[str] = typer.Option(
            None, "--hparam", help="Method hyperparameter KEY=VALUE (repeatable), e.g. ce_weight=0 or mode=two-stage."
        ),
        views: str = typer.Option(
            "first", "--views",
            help="Stores with several views: first, next (per epoch) or random. A store dumped with --augment replays "
            "the chosen view's stored parameters, so the student sees exactly what the teacher saw.",
        ),
        student_augment: str = typer.Option(
            None, "--student-augment",
            help="STUDENT-ONLY augmentation, NOT seen by the teacher, fresh per epoch and applied after any replayed "
            "view: shift1d[:max=6], noise[:std=0.05] or flip[:p=0.5].",
        ),
        eval_split: str = typer.Option(
            "auto", "--eval-split", help="Held-out split evaluated every epoch: auto (test, else val), a split name, "
            "or '' for none. A dataset with neither needs --holdout."
        ),
        holdout: float = typer.Option(
            None, "--holdout", help="Hold out this fraction of the train rows (seeded by --seed), left out of training, "
            "and evaluate on it, e.g. 0.1: for image folders without a test or val folder."
        ),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes (0: read in the main process)."),
        allow: list[str] = typer.Option(
            None, "--allow", help="Train even though the dataset differs from the one a store records in this way "
            "(repeatable): spec, preprocessing, labels, files, classes or teacher. Prints a warning naming each "
            "difference and records them in metrics.json (allowed_mismatch). A different sample or class count is "
            "always refused."
        ),
        threads: int = typer.Option(
            0, "--threads", min=0, help="torch intra-op threads for this run (0: torch's default); 1 is often fastest "
            "on a busy machine.",
        ),
        expect_digest: list[str] = typer.Option(
            None, "--expect-digest", help="Refuse unless the store's digest (as `softlabels info` prints it) is this "
            "sha256:...; repeat once per --store, in order. Pins exactly the store that was reviewed."
        ),
        dist_timeout: float = typer.Option(
            DIST_TIMEOUT, "--dist-timeout", help="Under torchrun: seconds a rank waits for the others in a collective "
            "before it stops with an error (a rank died or hangs). Rank 0 evaluates and checkpoints while the others "
            "wait, so it must exceed one evaluation."
        ),
        quiet: bool = flag("--quiet", "-q", help="No progress bar."),
        storage_option: list[str] = storage_option_flag(),
        out: Path = typer.Option(..., "--out", help="Output directory for student.pt, metrics.json and checkpoint.pt."),
    ) -> None:
        """Train a student from teacher targets stored by `softlabels dump` (the teacher is not needed).

        On many GPUs or machines: torchrun --nproc-per-node N -m softlabels train ... (DistributedDataParallel;
        --batch-size is per rank; rank 0 evaluates and writes OUT)."""
        from rich.console import Console
        from rich.markup import escape

        from softlabels.datasets.identity import parse_allow
        from softlabels.train import train_student

        from softlabels.recipe import Recipe

        err = Console(stderr=True)
        if threads:
            import torch

            torch.set_num_threads(threads)  # this command owns the process
        metrics = train_student(
            store or None,
            dataset,
            student,
            method,
            temperature=temperature,
            k=k,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            recipe=Recipe(
                optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                warmup_epochs=warmup_epochs, decay_epochs=decay_epochs, decay_rate=decay_rate, amp=amp,
                channels_last=channels_last, grad_clip=grad_clip,
            ),
            augment=not no_aug,
            student_feature_layer=student_feature_layer,
            max_preload_bytes=max_preload_bytes,
            resume=resume,
            out_dir=out,
            eval_split=eval_split or None,
            holdout=holdout,
            hparams=parse_hparams(hparam),
            progress=not quiet,
            allow_mismatch=parse_allow(allow),
            views=views,
            student_augment=student_augment,
            num_workers=workers,
            storage_options=parse_storage_options(storage_option),
            expect_digests=expect_digest or None,
            dist_timeout=dist_timeout,
            warn=lambda message: err.print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True),
        )
        if "test_accuracy" not in metrics:  # a torchrun rank other than 0: rank 0 reports
            return
        acc, epochs = metrics["test_accuracy"], metrics["epochs"]
        result = ("no evaluation split" if metrics["eval_split"] is None or acc is None
                  else f"{metrics['eval_split']} accuracy {100 * acc:.2f}%")
        print(
            f"{method}: {result} after {epochs} epoch{'s' if epochs != 1 else ''} "
            f"({metrics['wall_seconds']:.1f} s); wrote {out / 'student.pt'} and {out / 'metrics.json'}"
        )
