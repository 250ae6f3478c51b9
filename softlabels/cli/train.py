"""``softlabels train``: train a student from stores, without the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from softlabels.cli.options import parse_key_values, parse_storage_options, storage_option_flag
from softlabels.losses import list_methods
from softlabels.train import DEFAULTS



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
        dataset: str = typer.Option(..., "--dataset", help="Dataset spec the stores were dumped from, e.g. mnist1d."),
        student: str = typer.Option("builtin:mlp", "--student", help="Student spec: builtin:<arch> (mlp, cnn, ...)."),
        method: str = typer.Option(..., "--method", help=f"Distillation method: {', '.join(list_methods(registration_order=True))}."),
        temperature: float = typer.Option(None, "--temperature", "-T", help="One of the store's temperatures (default: the method's, 4)."),
        k: int = typer.Option(None, "--k", help="Use the first k stored top-k logits (default: all stored)."),
        epochs: int = typer.Option(DEFAULTS["epochs"], "--epochs", help="Training epochs."),
        seed: int = typer.Option(DEFAULTS["seed"], "--seed", help="Seed for initialisation, shuffling and view selection."),
        batch_size: int = typer.Option(DEFAULTS["batch_size"], "--batch-size", help="Batch size."),
        lr: float = typer.Option(DEFAULTS["lr"], "--lr", help="Adam learning rate (cosine decay to 0)."),
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
        eval_split: str = typer.Option("test", "--eval-split", help="Held-out split evaluated every epoch."),
        workers: int = typer.Option(0, "--workers", help="DataLoader worker processes (0: read in the main process)."),
        allow_mismatch: bool = typer.Option(
            False, "--allow-mismatch", help="Train even when the dataset differs from the one a store records (spec, split, "
            "preprocessing, labels or inputs): prints a warning naming each difference and records them in metrics.json "
            "(allowed_mismatch). A different sample or class count is always refused."
        ),
        expect_digest: list[str] = typer.Option(
            None, "--expect-digest", help="Refuse unless the store's digest (as `softlabels info` prints it) is this "
            "sha256:...; repeat once per --store, in order. Pins exactly the store that was reviewed."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        storage_option: list[str] = storage_option_flag(),
        out: Path = typer.Option(..., "--out", help="Output directory for student.pt and metrics.json."),
    ) -> None:
        """Train a student from teacher targets stored by `softlabels dump` (the teacher is not needed)."""
        from rich.console import Console
        from rich.markup import escape

        from softlabels.train import train_student

        err = Console(stderr=True)
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
            lr=lr,
            out_dir=out,
            eval_split=eval_split or None,
            hparams=parse_hparams(hparam),
            progress=not quiet,
            allow_mismatch=allow_mismatch,
            views=views,
            student_augment=student_augment,
            num_workers=workers,
            storage_options=parse_storage_options(storage_option),
            expect_digests=expect_digest or None,
            warn=lambda message: err.print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True),
        )
        acc = metrics["test_accuracy"]
        acc_text = "n/a" if acc is None else f"{100 * acc:.2f}%"
        print(
            f"{method}: {metrics['eval_split']} accuracy {acc_text} after {metrics['epochs']} epochs "
            f"({metrics['wall_seconds']:.1f} s); wrote {out / 'student.pt'} and {out / 'metrics.json'}"
        )
