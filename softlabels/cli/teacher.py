"""``softlabels teacher ...``: train a teacher whose targets are then dumped once.

Heavy imports (torch, datasets) happen inside the command so ``softlabels --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from softlabels.errors import SpecError

__all__ = ["teacher_app", "DEFAULT_EPOCHS"]

DEFAULT_EPOCHS = 40

teacher_app = typer.Typer(
    help="Train teachers on a labelled dataset (the teacher half of offline distillation).",
    no_args_is_help=True,
    add_completion=False,
)


def _teacher_spec(arch: str) -> str:
    arch = arch.strip()
    return arch if ":" in arch else f"builtin:{arch}"


def _check_out(out: Path) -> Path:
    if out.is_dir():
        raise SpecError(f"--out {out} is a directory; give a file path such as {out / 'teacher.pt'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise SpecError(f"--out {out}: {out.parent} is not a directory")
    return out


def _save_atomic(state_dict: dict, out: Path) -> None:
    """Write to a temporary file next to ``out`` and rename it over ``out``: readers never see
    a half-written checkpoint."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


@teacher_app.command("fit")
def fit(
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="Dataset spec: mnist1d, digits, synthetic:tau=0.5, cifar10:/path, imagefolder:/path ..."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="File to write the trained state_dict to (e.g. teacher.pt)."),
    arch: str = typer.Option(
        "cnn", "--arch", "-a", help="Built-in architecture (cnn, mlp, resmlp, linear, tangmlp-<W>, resnet20, "
        "resnet56) or a teacher spec (torchvision:resnet18, package.module:factory)."
    ),
    epochs: int = typer.Option(DEFAULT_EPOCHS, "--epochs", min=1, help="Training epochs."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and shuffling (CPU runs are reproducible)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Mini-batch size."),
    lr: float = typer.Option(1e-2, "--lr", min=0.0, help="Peak Adam learning rate (cosine decay to 0)."),
    threads: int = typer.Option(
        0, "--threads", min=0, help="torch intra-op threads for this run (0: torch's default). 1 is often "
        "fastest for these small models, and much faster on a busy machine."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only the result line."),
) -> None:
    """Train a classifier on the train split (eval preprocessing, no augmentation), report
    test-split accuracy and save a plain state_dict usable as --teacher ... --weights OUT."""
    import torch

    from softlabels.datasets import load_dataset
    from softlabels.fit import fit_classifier
    from softlabels.teachers import build_teacher_model

    out = _check_out(out)
    if threads:
        torch.set_num_threads(threads)  # this command owns the process
    spec = _teacher_spec(arch)
    train_set, info = load_dataset(dataset, "train")
    test_set, _ = load_dataset(dataset, "test")
    if info.labels is None:
        raise SpecError(f"{info.spec} train split is unlabeled; a teacher needs labels")
    model = build_teacher_model(spec, info.input_shape, info.num_classes, seed=seed)
    if not quiet:
        params = sum(p.numel() for p in model.parameters())
        typer.echo(
            f"fitting {spec} ({params:,} parameters) on {info.spec} "
            f"({info.num_samples} train samples, {info.num_classes} classes)",
            err=True,
        )
    result = fit_classifier(
        model, train_set, test_set, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, progress=not quiet
    )
    _save_atomic(model.state_dict(), out)
    typer.echo(
        f"test accuracy {result['test_accuracy']:.4f} (train {result['train_accuracy']:.4f}) "
        f"after {epochs} epochs in {result['seconds']:.1f} s; wrote {out}"
    )
    if not quiet:
        typer.echo(f"dump its targets with: --teacher {spec} --weights {out}", err=True)
