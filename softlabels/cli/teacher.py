"""``softlabels teacher ...``: train a teacher whose targets are then dumped once.

Heavy imports (torch, datasets) happen inside the command so ``softlabels --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from softlabels.cli.options import DATA, OUTPUT, TEACHER, TRAINING, WORKERS, flag
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


EXAMPLES = "\n\n".join([
    "[bold]Examples[/]",
    "softlabels teacher fit --dataset mnist1d --arch cnn --epochs 40 --out teacher.pt",
    "softlabels teacher fit --dataset 'imagefolder:/data/photos?size=64&crop=56' --arch torchvision:resnet18 "
    "--eval-split val --out r18.pt",
    "softlabels teacher fit --dataset 'imagefolder:/data/one-folder?size=64&crop=56' --holdout 0.1 --out t.pt",
])


@teacher_app.command("fit", epilog=EXAMPLES)
def fit(
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="Dataset spec: mnist1d, digits, synthetic:tau=0.5, cifar10:/data/cifar, "
        "imagefolder:/data/photos?size=256&crop=224 (softlabels list datasets).", rich_help_panel=DATA,
    ),
    eval_split: str = typer.Option(
        None, "--eval-split", help="Held-out split to report accuracy on. [default: test, else val]", rich_help_panel=DATA,
    ),
    holdout: float = typer.Option(
        None, "--holdout", help="Hold out this fraction of train (seeded by --seed) and report accuracy on it; for "
        "datasets without a test or val split (e.g. 0.1).", rich_help_panel=DATA,
    ),
    arch: str = typer.Option(
        "cnn", "--arch", "-a", help="Built-in architecture (cnn, mlp, resmlp, linear, tangmlp-<W>, resnet20, "
        "resnet56) or a teacher spec (torchvision:resnet18, package.module:factory); softlabels list teachers.",
        rich_help_panel=TEACHER,
    ),
    epochs: int = typer.Option(DEFAULT_EPOCHS, "--epochs", min=1, help="Training epochs.", rich_help_panel=TRAINING),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, shuffling and --holdout (CPU runs are reproducible).",
                             rich_help_panel=TRAINING),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Mini-batch size.", rich_help_panel=TRAINING),
    lr: float = typer.Option(1e-2, "--lr", min=0.0, help="Peak Adam learning rate (cosine decay to 0).", rich_help_panel=TRAINING),
    threads: int = typer.Option(
        0, "--threads", min=0, help="torch intra-op threads for this run (0: torch's default). 1 is often "
        "fastest for these small models, and much faster on a busy machine.", rich_help_panel=WORKERS,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="File to write the trained state_dict to (e.g. teacher.pt).",
                             rich_help_panel=OUTPUT),
    quiet: bool = flag("--quiet", "-q", help="No progress bar; print only the result line.", panel=OUTPUT),
) -> None:
    """Train a classifier on the train split (eval preprocessing, no augmentation), report its accuracy on
    a held-out split (test, val, or --holdout) and save a plain state_dict usable as --teacher ... --weights OUT."""
    import torch

    from softlabels.datasets import load_dataset
    from softlabels.datasets.splits import choose_eval_split
    from softlabels.datasets.splits import holdout as hold_out
    from softlabels.fit import fit_classifier
    from softlabels.teachers import build_teacher_model

    out = _check_out(out)
    if threads:
        torch.set_num_threads(threads)  # this command owns the process
    spec = _teacher_spec(arch)
    train_set, info = load_dataset(dataset, "train")
    if info.labels is None:
        raise SpecError(f"{info.spec} train split is unlabeled; a teacher needs labels")
    split = choose_eval_split(dataset, "train", eval_split, holdout)
    if split is None:
        part = hold_out(train_set, holdout, seed)
        train_set, test_set = part.train, part.held_out
        where = f"holdout ({part.held_out_index.size} of {info.num_samples} train samples, seed {seed})"
    else:
        test_set, _ = load_dataset(dataset, split)
        where = split
    model = build_teacher_model(spec, info.input_shape, info.num_classes, seed=seed)
    if not quiet:
        params = sum(p.numel() for p in model.parameters())
        typer.echo(
            f"fitting {spec} ({params:,} parameters) on {info.spec} "
            f"({len(train_set)} train samples, {info.num_classes} classes); evaluating on {where}",
            err=True,
        )
    result = fit_classifier(
        model, train_set, test_set, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, progress=not quiet
    )
    _save_atomic(model.state_dict(), out)
    typer.echo(
        f"{split or 'holdout'} accuracy {result['test_accuracy']:.4f} (train {result['train_accuracy']:.4f}) "
        f"after {epochs} epochs in {result['seconds']:.1f} s; wrote {out}"
    )
    if not quiet:
        typer.echo(f"dump its targets with: --teacher {spec} --weights {out}", err=True)
