"""``softlabels report``: one self-contained HTML file about stores and the students trained from them."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from softlabels.cli.options import parse_storage_options, storage_option_flag
from softlabels.errors import SoftlabelsError


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        stores: list[str] = typer.Argument(
            None, help="Stores to report on (paths or URLs). Two or more over the same dataset and split are compared "
            "with the first; stores over different splits of one dataset are shown side by side."),
        runs: list[str] = typer.Option(
            None, "--runs", help="A `softlabels train --out` directory, or a directory above several (repeatable). "
            "Runs are grouped by recipe apart from the seed."),
        out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write (--format html)."),
        fmt: str = typer.Option("html", "--format", help="html: write --out with embedded PNG figures; md: print the "
                                "tables as Markdown to stdout (for CI logs), no figures."),
        temperature: float = typer.Option(
            None, "--temperature", "-T", help="T of the class-similarity maps, view spread and store comparison; must "
            "be stored in every store (default: the common stored T closest to 4, else 1)."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Re-read every chunk's checksum for the header's "
                                    "verify status (as `softlabels verify`)."),
        storage_option: list[str] = storage_option_flag(),
    ) -> None:
        """Report on stores (confidence, top-k mass, calibration, class similarity, agreement) and student runs."""
        if fmt not in ("html", "md"):
            raise SoftlabelsError(f"--format must be html or md, got {fmt!r}")
        from softlabels.report import build_report

        result = build_report(list(stores or []), list(runs or []), temperature=temperature, verify=verify,
                              storage_options=parse_storage_options(storage_option))
        if fmt == "md":
            sys.stdout.write(result.markdown())
            return
        if out.is_dir():
            raise SoftlabelsError(f"--out {out} is a directory; pass a file name such as {out / 'report.html'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.html(), encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(result.figures())} figures); open it in a browser")
