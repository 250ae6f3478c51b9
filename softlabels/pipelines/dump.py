"""``softlabels dump``: plan the store from the teacher and dataset, then fill it on Ray.

The driver loads the teacher once on the CPU to learn its class count, feature widths and
classifier (and to fail fast on a bad spec or checkpoint before any store exists), creates or
resumes the store, hands the pending units to Ray, records each finished unit, and finalizes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from softlabels.data.provenance import store_dataset_metadata
from softlabels.errors import InvalidTargetsError, SoftlabelsError, SpecError
from softlabels.fields import check_k_range
from softlabels.pipelines.predictor import DumpConfig, TeacherPredictor
from softlabels.stores import format as fmt
from softlabels.stores.location import HTTP_READ_ONLY, is_http, is_remote, resolve_storage_options
from softlabels.stores.writer import StoreWriter, check_create_mode


@dataclass(frozen=True)
class DumpResult:
    location: str
    rows: int
    units_total: int
    units_written: int
    bytes_on_disk: int
    wall_seconds: float
    rows_per_second: float  # teacher throughput once the workers are up
    startup_seconds: float = 0.0  # Ray start and worker construction
    workers: int = 0
    summary: dict | None = None  # the store's fidelity figures (FORMAT.md §3)

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_on_disk / max(self.rows, 1)


def check_output(out: str, *, resume: bool, overwrite: bool, storage_options: dict | None = None) -> None:
    """Cheap checks before the teacher is loaded: existing output, writable parent."""
    if is_http(out):
        raise SoftlabelsError(f"cannot write {out}: {HTTP_READ_ONLY}")
    check_create_mode(out, resume=resume, overwrite=overwrite, storage_options=storage_options)
    if not is_remote(out):
        parent = Path(out).absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise SoftlabelsError(f"cannot write {out}: {parent} is a file, not a directory; choose another --out")
        if not os.access(parent, os.W_OK):
            raise SoftlabelsError(f"cannot write {out}: {parent} is not writable; choose a writable --out")


def check_views(views: int, augment: str | None) -> None:
    """Cheap checks of ``--views``/``--augment`` before the teacher is loaded."""
    from softlabels.augment import get_policy

    if views < 1:
        raise SpecError(f"--views must be at least 1, got {views}")
    policy = get_policy(augment)  # unknown policy -> SpecError listing the known ones
    if views > 1 and policy.name == "none":
        raise SpecError(
            f"--views {views} without --augment would store {views} identical views; pass --augment POLICY "
            "(e.g. shift1d for mnist1d, crop-flip for imagefolder) or --views 1"
        )


def plan_store(config: DumpConfig, predictor: TeacherPredictor) -> tuple[fmt.StoreSchema, np.ndarray, np.ndarray | None]:
    """The store schema and the teacher classifier, from one probe forward pass."""
    from softlabels.teachers import classifier_parameters

    info, teacher = predictor.info, predictor.teacher
    probe = predictor.probe()
    num_classes = probe["num_classes"]
    if info.labels is not None and info.labels.size and int(info.labels.max()) >= num_classes:
        raise InvalidTargetsError(
            f"dataset {info.spec} has labels up to {int(info.labels.max())} but the teacher outputs "
            f"{num_classes} classes; use a teacher trained on this label set"
        )
    check_k_range(predictor.k, num_classes)
    check_views(config.views, config.augment)
    predictor.policy.check_dataset(predictor.dataset, info)
    augmentation = None
    if predictor.augmented:
        augmentation = predictor.policy.metadata(config.augment_seed)
    weight, bias = classifier_parameters(teacher)
    dataset = store_dataset_metadata(info)
    teacher_meta = teacher.to_dict()
    teacher_meta["feature_dims"] = probe["features"]
    teacher_meta["weights_file"] = os.path.basename(config.weights) if config.weights else None
    schema = fmt.StoreSchema(
        num_samples=info.num_samples,
        num_classes=num_classes,
        k=predictor.k,
        temperatures=tuple(config.temperatures),
        views=config.views,
        labeled=info.labels is not None,
        value_dtype=config.value_dtype,
        features=tuple(probe["features"].items()),
        classifier_dim=None if weight is None else int(weight.shape[1]),
        classifier_bias=bias is not None,
        rows_per_shard=config.rows_per_shard,
        rows_per_chunk=config.rows_per_chunk,
        teacher=teacher_meta,
        dataset=dataset,
        augmentation=augmentation,
        codec=None if config.codec == "fp16" else {"name": config.codec},
    )
    return schema, weight, bias


def run_dump(
    config: DumpConfig,
    *,
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int, int, int], None] | None = None,
    on_unit: Callable[[int, int], None] | None = None,
    on_actors: Callable[[list], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> DumpResult:
    """Run (or resume) a dump. ``on_start(rows_total, rows_pending, units_pending)``,
    ``on_unit(unit, rows)`` (a unit is written) and ``on_rows(rows)`` (rows through the teacher
    so far in this run, between units) drive a progress display."""
    from softlabels.pipelines import ray_dump

    # Explicit options (CLI + the driver's AWS_* variables) so Ray workers write with the same
    # endpoint and credentials, whatever their own environment holds.
    config = replace(config, storage_options=resolve_storage_options(config.out, config.storage_options))
    shown = config.out
    if not is_remote(config.out):  # workers of a joined cluster may run in another directory
        config = replace(config, out=os.path.abspath(config.out))
    check_output(config.out, resume=resume, overwrite=overwrite, storage_options=config.storage_options)
    check_views(config.views, config.augment)
    t0 = time.perf_counter()
    predictor = TeacherPredictor(config, device=torch.device("cpu"))
    schema, weight, bias = plan_store(config, predictor)
    loaded = predictor.loaded()
    del predictor
    writer = StoreWriter.create(
        config.out, schema, classifier_weight=weight, classifier_bias=bias, resume=resume, overwrite=overwrite,
        storage_options=config.storage_options,
    )
    config = replace(config, run_id=writer.run_id)  # workers write only while this run owns the store
    pending = writer.pending_units()
    rows_pending = sum(stop - start for start, stop in map(schema.unit_range, pending))
    if on_start is not None:
        on_start(schema.num_samples, rows_pending, len(pending))

    def done(unit: int, digests: dict[str, str]) -> None:
        writer.mark_complete(unit, digests)
        if on_unit is not None:
            start, stop = schema.unit_range(unit)
            on_unit(unit, stop - start)

    timing = {"startup_seconds": 0.0, "work_seconds": 0.0, "workers": 0}
    if pending:
        timing = ray_dump.run_units(
            config, pending, workers=workers, address=address, on_done=done, on_actors=on_actors, loaded=loaded,
            on_rows=on_rows,
        )
    work_s = timing["work_seconds"]
    rate = rows_pending / work_s if work_s > 0 else 0.0
    if writer.meta.get("status") != "complete":
        writer.finalize({"dump": {"rows_per_second": rate, "workers": timing["workers"]}})
    summary = writer.meta.get("summary")
    size = writer.bytes_on_disk()
    return DumpResult(
        location=shown,
        rows=schema.num_samples,
        units_total=schema.num_units,
        units_written=len(pending),
        bytes_on_disk=size,
        wall_seconds=time.perf_counter() - t0,
        rows_per_second=rate,
        startup_seconds=timing["startup_seconds"],
        workers=int(timing["workers"]),
        summary=summary,
    )
