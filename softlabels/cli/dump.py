"""``softlabels dump``: run a teacher over a dataset on Ray workers into a store."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from softlabels.cli.options import parse_storage_options, storage_option_flag
from softlabels.errors import SoftlabelsError
from softlabels.pipelines.predictor import PENULTIMATE, DumpConfig
from softlabels.stores.format import VALUE_DTYPES


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SoftlabelsError(f"--temperatures must be comma-separated numbers like 1,2,4,8, got {text!r}") from None
    if not temps or any(t <= 0 for t in temps):
        raise SoftlabelsError(f"--temperatures must be positive numbers like 1,2,4,8, got {text!r}")
    return temps


def register(app: typer.Typer) -> None:
    @app.command()
    def dump(
        teacher: str = typer.Option(..., help="Teacher spec: builtin:ARCH, torchvision:ARCH, timm:ARCH or package.module:factory."),
        dataset: str = typer.Option(..., help="Dataset spec: mnist1d, digits, synthetic, cifar100:/root, imagefolder:/path, ..."),
        out: str = typer.Option(..., help="Output store: a directory or s3://bucket/path (workers write to it directly)."),
        weights: str = typer.Option(None, help="Teacher state_dict file, loaded with torch.load(weights_only=True)."),
        split: str = typer.Option("train", help="Dataset split to dump (train, test, transfer, ...)."),
        k: int = typer.Option(10, help="Top-k logits to keep per sample."),
        temperatures: str = typer.Option("1,2,4,8", help="Temperatures whose log-normalisers are stored (exact targets at each)."),
        feature_layer: list[str] = typer.Option(
            None, "--feature-layer", help="Module whose output to store (repeatable). Default: the classifier's input ('penultimate')."
        ),
        no_features: bool = typer.Option(False, "--no-features", help="Store no feature arrays."),
        views: int = typer.Option(
            1, "--views", help="Augmented views per sample (V); each view's parameters, targets and features are stored, so the store grows "
            "V-fold (features dominate: add --no-features unless a feature method needs them). Needs --augment when > 1."
        ),
        augment: str = typer.Option(
            "none", "--augment",
            help="Augmentation policy whose explicit parameters are stored per (sample, view): none, shift1d[:max=6] (1-D signals), "
            "crop-flip[:min_scale=0.08,...] (imagefolder). See docs/FORMAT.md 'Augmentation'.",
        ),
        augment_seed: int = typer.Option(0, "--augment-seed", help="Seed of the augmentation parameters (keyed by seed, sample, view)."),
        value_dtype: str = typer.Option(VALUE_DTYPES[0], help=f"Storage dtype of logits: {' or '.join(VALUE_DTYPES)}."),
        batch_size: int = typer.Option(256, help="Teacher batch size."),
        loader_workers: int = typer.Option(
            1, min=0, help="Decoding processes per Ray worker for file datasets (images); they run ahead across units. 0 decodes in the worker itself."
        ),
        workers: int = typer.Option(None, help="CPU Ray workers (default: one per GPU, or 1 without GPUs)."),
        address: str = typer.Option(None, help="Join an existing Ray cluster instead of starting one."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted dump into OUT."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at OUT."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary (for scripts)."),
        storage_option: list[str] = storage_option_flag(),
    ) -> None:
        """Run TEACHER over DATASET once and write top-k logits, normalisers, labels and features to OUT."""
        from softlabels.pipelines.dump import run_dump

        if k < 1:
            raise SoftlabelsError(f"--k must be at least 1, got {k}")
        if workers is not None and workers < 1:
            raise SoftlabelsError(f"--workers must be at least 1, got {workers}")
        if value_dtype not in VALUE_DTYPES:
            raise SoftlabelsError(f"--value-dtype must be {' or '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        from softlabels.pipelines.dump import check_views

        check_views(views, augment)
        layers = () if no_features else tuple(feature_layer or (PENULTIMATE,))
        config = DumpConfig(
            teacher=teacher, dataset=dataset, out=out, weights=weights, split=split, k=k,
            temperatures=parse_temperatures(temperatures), feature_layers=layers, value_dtype=value_dtype,
            batch_size=batch_size, loader_workers=loader_workers, views=views, augment=augment,
            augment_seed=augment_seed, storage_options=parse_storage_options(storage_option),
        )
        console = Console(stderr=True)
        progress = Progress(
            TextColumn("[bold]dump"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TextColumn("{task.fields[rate]}"), TextColumn("units {task.fields[units]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
        )
        state = {"units": 0, "units_total": 0}
        task = progress.add_task("dump", total=None, rate="", units="")

        def on_start(rows_total: int, rows_pending: int, units_pending: int) -> None:
            state["units_total"] = units_pending
            progress.update(task, total=rows_pending, units=f"0/{units_pending}")
            if not quiet and rows_pending < rows_total:
                console.print(f"resuming: {rows_total - rows_pending:,} of {rows_total:,} rows already written")

        def on_unit(unit: int, rows: int) -> None:
            state["units"] += 1
            progress.advance(task, rows)
            t = progress.tasks[0]
            rate = f"{t.speed:,.0f} rows/s" if t.speed else ""
            progress.update(task, rate=rate, units=f"{state['units']}/{state['units_total']}")

        with progress:
            result = run_dump(config, workers=workers, address=address, resume=resume, overwrite=overwrite,
                              on_start=on_start, on_unit=on_unit)
        if not quiet:
            console.print(
                f"[green]wrote[/] {result.location}: {result.rows:,} rows in {result.units_total} units "
                f"({result.units_written} this run), {result.bytes_per_sample:.1f} B/sample, "
                f"{result.wall_seconds:.1f} s wall ({result.startup_seconds:.1f} s starting {result.workers} "
                f"worker(s)), teacher throughput {result.rows_per_second:,.0f} rows/s"
            )
