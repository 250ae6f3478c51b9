"""``softlabels dump``: run a teacher over a dataset on Ray workers into a store."""

from __future__ import annotations

import typer
from softlabels.cli.options import DATA, OUTPUT, TARGETS, TEACHER, WORKERS, flag, parse_storage_options, storage_option_flag
from softlabels.errors import SoftlabelsError
from softlabels.progress import Progress


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise SoftlabelsError(f"--temperatures must be comma-separated numbers like 1,2,4,8, got {text!r}") from None
    if not temps or any(t <= 0 for t in temps):
        raise SoftlabelsError(f"--temperatures must be positive numbers like 1,2,4,8, got {text!r}")
    return temps


EXAMPLES = "\n\n".join([
    "[bold]Examples[/]",
    "softlabels dump --teacher builtin:cnn --weights teacher.pt --dataset mnist1d --out train.zarr --workers 2",
    "softlabels dump --teacher builtin:cnn --weights teacher.pt --dataset mnist1d --split transfer --out transfer.zarr",
    "softlabels dump --teacher torchvision:resnet18 --weights r18.pt --dataset 'imagefolder:/data/photos?size=256&crop=224' "
    "--split val --views 4 --augment crop-flip --no-features --out val.zarr",
])


def register(app: typer.Typer) -> None:
    @app.command(epilog=EXAMPLES)
    def dump(
        teacher: str = typer.Option(
            ..., help="Teacher spec: builtin:cnn, torchvision:resnet18, timm:ARCH or package.module:factory "
            "(softlabels list teachers).", rich_help_panel=TEACHER,
        ),
        weights: str = typer.Option(
            None, help="Teacher state_dict file (e.g. from `softlabels teacher fit`), loaded with "
            "torch.load(weights_only=True).", rich_help_panel=TEACHER,
        ),
        feature_layer: list[str] = typer.Option(
            None, "--feature-layer", help="Module whose output to store (repeatable), e.g. layer4. Default: the "
            "classifier's input ('penultimate').", rich_help_panel=TEACHER,
        ),
        no_features: bool = flag("--no-features", help="Store no feature arrays.", panel=TEACHER),
        dataset: str = typer.Option(
            ..., help="Dataset spec: mnist1d, digits, synthetic:tau=0.5, cifar10:/data/cifar, "
            "imagefolder:/data/photos?size=256&crop=224 (softlabels list datasets).", rich_help_panel=DATA,
        ),
        split: str = typer.Option("train", help="Dataset split to dump: train, val, test, transfer, ...", rich_help_panel=DATA),
        views: int = typer.Option(
            1, "--views", help="Augmented views per sample (V); each view's parameters, targets and features are stored, so the store grows "
            "V-fold (features dominate: add --no-features unless a feature method needs them). Needs --augment when > 1.",
            rich_help_panel=DATA,
        ),
        augment: str = typer.Option(
            "none", "--augment",
            help="Augmentation policy whose explicit parameters are stored per (sample, view): none, shift1d:max=6 (1-D signals), "
            "crop-flip:min_scale=0.08 (imagefolder; view 0 is the clean evaluation view). softlabels list augmentations.",
            rich_help_panel=DATA,
        ),
        augment_seed: int = typer.Option(0, "--augment-seed", help="Seed of the augmentation parameters (keyed by seed, sample, view).",
                                         rich_help_panel=DATA),
        k: int = typer.Option(None, help="Top-k logits to keep per sample. [default: min(10, classes)]", rich_help_panel=TARGETS),
        temperatures: str = typer.Option("1,2,4,8", help="Temperatures whose log-normalisers are stored (exact targets at each).",
                                         rich_help_panel=TARGETS),
        codec: str = typer.Option(
            "fp16", "--codec",
            help="Target codec: fp16 (top-k logits as --value-dtype floats) or compact (~1 byte per stored number: "
            "quantised log-probabilities, 8-bit tail masses; format 1.2, see docs/FORMAT.md 'Compact codec').",
            rich_help_panel=TARGETS,
        ),
        value_dtype: str = typer.Option(
            "float16", help="Storage dtype of logits with --codec fp16: float16 (log-probabilities below -65504 are stored as -65504, "
            "probability 0 either way; see docs/FORMAT.md) or float32.", rich_help_panel=TARGETS,
        ),
        workers: int = typer.Option(None, help="CPU Ray workers (default: one per GPU, or 1 without GPUs).", rich_help_panel=WORKERS),
        batch_size: int = typer.Option(256, help="Teacher batch size.", rich_help_panel=WORKERS),
        loader_workers: int = typer.Option(
            1, min=0, help="Decoding processes per Ray worker for file datasets (images); they run ahead across units. "
            "0 decodes in the worker itself.", rich_help_panel=WORKERS,
        ),
        address: str = typer.Option(None, help="Join an existing Ray cluster (e.g. auto or ray://host:10001) instead of starting one.",
                                    rich_help_panel=WORKERS),
        out: str = typer.Option(..., help="Output store: a directory or s3://bucket/path (workers write to it directly).",
                                rich_help_panel=OUTPUT),
        resume: bool = flag("--resume", help="Continue an interrupted dump into OUT.", panel=OUTPUT),
        overwrite: bool = flag("--overwrite", help="Replace an existing store at OUT.", panel=OUTPUT),
        quiet: bool = flag("--quiet", help="No progress or summary (for scripts).", panel=OUTPUT),
        storage_option: list[str] = storage_option_flag(panel=OUTPUT),
    ) -> None:
        """Run TEACHER over DATASET once and write top-k logits, normalisers, labels and features to OUT."""
        from softlabels.pipelines.dump import run_dump
        from softlabels.pipelines.predictor import PENULTIMATE, DumpConfig
        from softlabels.stores.format import VALUE_DTYPES

        if k is not None and k < 1:
            raise SoftlabelsError(f"--k must be at least 1, got {k}")
        if workers is not None and workers < 1:
            raise SoftlabelsError(f"--workers must be at least 1, got {workers}")
        if value_dtype not in VALUE_DTYPES:
            raise SoftlabelsError(f"--value-dtype must be {' or '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        if codec not in ("fp16", "compact"):
            raise SoftlabelsError(f"--codec must be fp16 or compact, got {codec!r}")
        if codec == "compact" and value_dtype != VALUE_DTYPES[0]:
            raise SoftlabelsError("--value-dtype applies to --codec fp16 only; the compact codec stores uint8 codes")
        from softlabels.pipelines.dump import check_views

        check_views(views, augment)
        layers = () if no_features else tuple(feature_layer or (PENULTIMATE,))
        config = DumpConfig(
            teacher=teacher, dataset=dataset, out=out, weights=weights, split=split, k=k,
            temperatures=parse_temperatures(temperatures), feature_layers=layers, value_dtype=value_dtype, codec=codec,
            batch_size=batch_size, loader_workers=loader_workers, views=views, augment=augment,
            augment_seed=augment_seed, storage_options=parse_storage_options(storage_option),
        )
        progress = Progress("dump", unit="rows", enabled=not quiet)
        state = {"units": 0, "units_total": 0, "rows": 0}

        def on_start(rows_total: int, rows_pending: int, units_pending: int) -> None:
            state["units_total"] = units_pending
            if not quiet and rows_pending < rows_total:
                typer.echo(f"resuming: {rows_total - rows_pending:,} of {rows_total:,} rows already written", err=True)
            progress.set_total(rows_pending)
            progress.fields["units"] = f"0/{units_pending}"

        def on_unit(unit: int, rows: int) -> None:
            state["units"] += 1
            state["rows"] += rows
            progress.update(state["rows"], units=f"{state['units']}/{state['units_total']}")

        with progress:
            result = run_dump(config, workers=workers, address=address, resume=resume, overwrite=overwrite,
                              on_start=on_start, on_unit=on_unit, on_rows=progress.update,
                              on_actors=lambda actors: progress.start())  # the clock starts with the workers
        if not quiet:
            for line in summary_lines(result, split):
                typer.echo(line, err=True)


def summary_lines(result, split: str) -> list[str]:
    """What the dump made: rows, time, rate, bytes per sample, and the store's fidelity figures."""
    lines = [
        f"wrote {result.location}: {result.rows:,} rows in {result.units_total} units ({result.units_written} this run) "
        f"in {result.wall_seconds:.1f} s ({result.startup_seconds:.1f} s starting {result.workers} worker(s)), "
        f"{result.rows_per_second:,.0f} rows/s, {result.bytes_per_sample:.1f} B/sample"
    ]
    summary = result.summary or {}
    if summary.get("teacher_top1_accuracy") is not None:
        lines.append(f"teacher top-1 accuracy on {split}: {summary['teacher_top1_accuracy']:.4f}; label in the "
                     f"stored top-k: {summary['label_in_topk']:.4f}")
    mass = summary.get("topk_mass") or {}
    if mass:
        lines.append("top-k mass (mean / min): " + ", ".join(
            f"T={t} {m['mean']:.4f} / {m['min']:.4f}" for t, m in mass.items()))
    clamped = sum((summary.get("float16_clamped") or {}).values())
    if clamped:
        lines.append(f"{clamped:,} log-probabilities below -65504 stored as -65504 (probability 0 at every stored T)")
    return lines
