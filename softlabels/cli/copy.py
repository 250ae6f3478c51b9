"""``softlabels copy``: copy a complete store between local disk and object storage, then verify it."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from softlabels.cli.options import parse_storage_options, storage_option_flag


def register(app: typer.Typer) -> None:
    @app.command()
    def copy(
        src: str = typer.Argument(..., help="Store to copy: a path, s3://bucket/path or http(s)://host/path."),
        dst: str = typer.Argument(..., help="Where to put the copy: a path or s3://bucket/path (http is read-only)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store (or partial copy) at DST."),
        storage_option: list[str] = storage_option_flag(
            help="fsspec option KEY=VALUE for both SRC and DST when remote (repeatable, values parsed as JSON), "
            "e.g. endpoint_url=http://127.0.0.1:9000. See docs/SHARING.md."
        ),
        src_option: list[str] = storage_option_flag("--src-option", help="fsspec option KEY=VALUE for SRC only (repeatable)."),
        dst_option: list[str] = storage_option_flag("--dst-option", help="fsspec option KEY=VALUE for DST only (repeatable)."),
        concurrency: int = typer.Option(16, "--concurrency", help="Objects in flight at once."),
        expect_digest: str = typer.Option(
            None, "--expect-digest", help="Refuse unless the copied store's digest (as `softlabels info` prints it) is "
            "this sha256:...; DST is then left unchanged."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar or summary (for scripts)."),
    ) -> None:
        """Copy the complete store SRC to DST byte for byte (no re-encoding), through a staging copy that is
        verified before it replaces DST.

        A store still being written, unsafe object keys and symbolic links are refused. Exits 1, naming the bad
        chunks, when the copy does not verify; DST is then left as it was."""
        from softlabels.errors import SoftlabelsError
        from softlabels.stores.copy import CopyVerifyError, copy_store
        from softlabels.stores.digest import parse_expected

        if concurrency < 1:
            raise SoftlabelsError(f"--concurrency must be at least 1, got {concurrency}")
        shared = parse_storage_options(storage_option)
        src_options = {**shared, **parse_storage_options(src_option, "--src-option")}
        dst_options = {**shared, **parse_storage_options(dst_option, "--dst-option")}
        console = Console(stderr=True)
        progress = Progress(
            TextColumn("[bold]copy"), BarColumn(), MofNCompleteColumn(), TextColumn("objects"),
            TextColumn("{task.fields[mb]:.2f} MB"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=console, disable=quiet,
        )
        task = progress.add_task("copy", total=None, mb=0.0, rate="")
        copied = {"bytes": 0, "t0": 0.0}

        def on_object(nbytes: int) -> None:
            copied["bytes"] += nbytes
            # the summary's clock: from the first object requested, not from opening the source
            elapsed = time.perf_counter() - copied["t0"]
            rate = f"{copied['bytes'] / 1e6 / elapsed:.1f} MB/s" if elapsed > 0 else ""
            progress.update(task, advance=1, mb=copied["bytes"] / 1e6, rate=rate)

        def on_start(objects: int) -> None:  # after every check passed: no bar for a refused copy
            progress.reset(task, total=objects)
            progress.start()
            copied["t0"] = time.perf_counter()

        try:
            result = copy_store(
                src, dst, source_options=src_options, destination_options=dst_options, overwrite=overwrite,
                concurrency=concurrency, on_start=on_start, on_object=on_object,
                expect_digest=parse_expected(expect_digest),
            )
        except CopyVerifyError as exc:
            progress.stop()
            for problem in exc.report.problems:
                sys.stderr.write(f"bad: {problem}\n")
            raise
        finally:
            progress.stop()
        if not quiet:
            console.print(
                f"[green]copied[/] {src} -> {dst}: {result.objects} objects, {result.bytes / 1e6:.2f} MB in "
                f"{result.seconds:.1f} s ({result.megabytes_per_second:.1f} MB/s); verified {result.chunks_verified} "
                f"chunks and {result.units_verified} units",
                highlight=False, soft_wrap=True,
            )
