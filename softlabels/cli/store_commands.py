"""``softlabels info`` and ``softlabels verify``: inspect and check a store."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from softlabels.cli.options import parse_storage_options, storage_option_flag
from softlabels.errors import SoftlabelsError
from softlabels.stores import format as fmt
from softlabels.stores.digest import parse_expected
from softlabels.stores.integrity import computed_digest
from softlabels.stores.metadata import STORE_DIGEST_KEY
from softlabels.stores.ownership import GENERATION_KEY, RUN_ID_KEY
from softlabels.stores.reader import open_store
from softlabels.stores.verify import verify_store


def store_info(location: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The JSON object ``info --json`` prints."""
    from softlabels.stores.reader import open_store

    store = open_store(location, allow_incomplete=True, storage_options=storage_options)
    s = store.schema
    size = store.bytes_on_disk()
    try:
        complete = store.completed_units()
    except SoftlabelsError:
        if store.meta.status == "complete":
            raise
        complete = np.zeros(s.num_units, dtype=bool)  # being created: no unit recorded yet
    digest = recorded = store.meta.raw.get(STORE_DIGEST_KEY)
    if store.meta.status == "complete":
        digest, _ = computed_digest(store, store.array(fmt.UNITS_SHA256)[...])
    return {
        "location": location,
        "status": store.meta.status,
        "format_version": store.meta.format_version,
        "softlabels_version": store.meta.raw.get("softlabels_version"),
        "created": store.meta.raw.get("created"),
        "completed": store.meta.raw.get("completed"),
        "num_samples": s.num_samples,
        "num_classes": s.num_classes,
        "k": s.k,
        "temperatures": list(s.temperatures),
        "views": s.views,
        "labeled": s.labeled,
        "codec": s.codec_name,
        "codec_params": s.codec,
        "value_dtype": s.value_dtype,
        "index_dtype": s.index_dtype,
        "features": dict(s.features),
        "classifier_stored": s.classifier_dim is not None,
        "units_complete": int(complete.sum()),
        "units_total": s.num_units,
        "rows_per_shard": s.rows_per_shard,
        "rows_per_chunk": s.rows_per_chunk,
        "bytes_on_disk": size,
        "bytes_per_sample": size / s.num_samples,
        "teacher": dict(s.teacher),
        "dataset": dict(s.dataset),
        "augmentation": s.augmentation,
        "summary": store.meta.summary,
        "store_digest": digest,
        "recorded_store_digest": recorded,
        "run_id": store.meta.raw.get(RUN_ID_KEY),
        "generation": store.meta.raw.get(GENERATION_KEY),
    }


def fidelity_rows(summary: dict[str, Any] | None, labeled: bool, k: int) -> list[tuple[str, str]]:
    """The table rows of the fidelity figures the writer recorded at finalize (FORMAT.md §3):
    per stored T the mean and minimum top-k mass, the teacher's top-1 accuracy (top-1 == label)
    and how often the label is among the stored top-k; over every (sample, view), and for view
    0 alone when the store has several views."""
    if summary is None:
        return [("fidelity", "n/a (store not finalized)")]
    rows = []
    scopes = [("", summary)] + ([(" (view 0)", summary["view0"])] if summary.get("view0") else [])
    for suffix, figures in scopes:
        for t, mass in (figures.get("topk_mass") or {}).items():
            rows.append((f"top-k mass T={t}{suffix}", f"mean {mass['mean']:.4f}, min {mass['min']:.4f}"))
    for name, stats in (summary.get("features") or {}).items():
        rows.append((f"features/{name}", f"mean {stats['mean']:,.4g}, RMS {stats['rms']:,.4g}"))
    clamped = summary.get("float16_clamped")
    if clamped is not None:
        rows.append(("float16 clamped", ", ".join(f"{n} {c:,}" for n, c in clamped.items()) + " (at -65504: probability 0)"))
    for suffix, figures in scopes:
        for key, label in (("teacher_top1_accuracy", "teacher top-1 accuracy"), ("label_in_topk", f"label in top-{k}")):
            value = figures.get(key)
            if not labeled:
                text = "n/a (unlabelled)"
            elif value is None:
                text = "not recorded (store written before format 1.1)"
            else:
                text = f"{value:.4f}"
            rows.append((label + suffix, text))
    codec = summary.get("codec_fidelity")
    if codec:  # the compact codec's own error, measured by the writer (FORMAT.md §8)
        for t, kl in codec["kl"].items():
            rows.append((f"codec KL T={t}", f"mean {kl['mean']:.2e}, max {kl['max']:.2e} (vs the dump's float32 targets)"))
        rows.append(("codec top-1 agreement", f"{100 * codec['top1_agreement']:.3f} %"))
    return rows


def _digest_text(data: dict[str, Any]) -> str:
    digest, recorded = data["store_digest"], data["recorded_store_digest"]
    if data["status"] != "complete":
        return "n/a (store not finalized)"
    if recorded is not None and recorded != digest:
        return f"{digest} [red](zarr.json records {recorded}: run `softlabels verify`)[/]"
    return f"{digest}" + ("" if recorded else " (not recorded: written before format 1.2)")


EXPECT_DIGEST_HELP = "Refuse unless the store's digest (as `softlabels info` prints it) is this sha256:..."


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        store: str = typer.Argument(..., help="Store path or URL."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        storage_option: list[str] = storage_option_flag(),
    ) -> None:
        """Show what a store holds: teacher, dataset, k, temperatures, size, fidelity."""
        data = store_info(store, parse_storage_options(storage_option))
        if as_json:
            print(json.dumps(data, indent=2, sort_keys=True))
            return
        table = Table(title=f"softlabels store {store}", show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        status = data["status"]
        table.add_row("status", f"[green]{status}[/]" if status == "complete" else f"[yellow]{status}[/]")
        table.add_row("format", f"v{data['format_version']} (softlabels {data['softlabels_version']})")
        table.add_row("samples x views", f"{data['num_samples']:,} x {data['views']}")
        table.add_row("classes / k", f"{data['num_classes']:,} / {data['k']}")
        table.add_row("temperatures", ", ".join(f"{t:g}" for t in data["temperatures"]))
        table.add_row("labels", "yes" if data["labeled"] else "no (transfer set)")
        params = data["codec_params"]
        if params:
            table.add_row("codec", f"{data['codec']} (log-prob step {params['logp_step']:g} nats, tail log-odds step "
                          f"{params['tail_step']:g}; uint8 values, {params['index_dtype']} indices)")
        else:
            table.add_row("codec", f"fp16 (values {data['value_dtype']}, indices {data['index_dtype']})")
        feats = ", ".join(f"{n} [{d}]" for n, d in data["features"].items()) or "none"
        table.add_row("features", feats)
        teacher = data["teacher"]
        table.add_row("teacher", f"{teacher.get('spec', '?')}  sha256 {str(teacher.get('checkpoint_sha256'))[:16]}")
        ds = data["dataset"]
        table.add_row("dataset", f"{ds.get('spec', '?')} split={ds.get('split', '?')}")
        manifest = ds.get("manifest")
        if manifest:
            classes = f", {len(manifest['classes'])} classes" if manifest.get("classes") else ""
            table.add_row("dataset files", f"{manifest['files']:,} files{classes}, content sha256 "
                          f"{str(manifest['content_sha256'])[:16]} (identity by content, any path)")
        if ds.get("labels_sha256"):
            table.add_row("labels sha256", str(ds["labels_sha256"])[:16])
        aug = data["augmentation"]
        if aug:
            params = ",".join(f"{key}={value}" for key, value in dict(aug.get("params") or {}).items())
            arrays = ", ".join(f"augment/{name}" for name in dict(aug.get("arrays") or {}))
            table.add_row("augmentation", f"{aug.get('policy')}{':' + params if params else ''} seed={aug.get('seed')} "
                          f"({arrays or 'no arrays'})")
        table.add_row("units", f"{data['units_complete']}/{data['units_total']} complete "
                      f"({data['rows_per_shard']:,} rows/shard, {data['rows_per_chunk']:,} rows/chunk)")
        table.add_row("size", f"{data['bytes_on_disk']:,} B ({data['bytes_per_sample']:.1f} B/sample)")
        for field, value in fidelity_rows(data["summary"], data["labeled"], data["k"]):
            table.add_row(field, value)
        console = Console()
        console.print(table)
        # on its own line, unwrapped, so that it can be copied into --expect-digest
        console.print(f"store digest: {_digest_text(data)}", soft_wrap=True, highlight=False)

    @app.command()
    def verify(
        store: str = typer.Argument(..., help="Store path or URL."),
        expect_digest: str = typer.Option(None, "--expect-digest", help=EXPECT_DIGEST_HELP),
        storage_option: list[str] = storage_option_flag(),
    ) -> None:
        """Re-read every chunk: checksums, completeness, digests, meaning of the values, metadata, the
        store digest and objects the format does not define. Exits 1 on any problem."""
        report = verify_store(
            store, storage_options=parse_storage_options(storage_option), expect_digest=parse_expected(expect_digest)
        )
        if report.ok:
            print(f"ok: {store}: {report.chunks_checked} chunks and {report.units_checked} units verified; "
                  f"store digest {report.digest}")
            return
        for problem in report.problems:
            sys.stderr.write(f"bad: {problem}\n")
        sys.stderr.write(f"error: {store}: {len(report.problems)} problem(s) found\n")
        raise typer.Exit(1)

