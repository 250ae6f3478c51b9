"""The dump's own ceiling: how many rows per second the store path (top-k and normalisers,
feature copies, validation, compression, zarr writes, Ray calls, completion records) sustains
per worker when the teacher costs nothing -- i.e. whether it could ever throttle a GPU teacher.

    python benchmarks/dump_ceiling.py                  # 32,768 rows, 3 interleaved rounds
    python benchmarks/dump_ceiling.py --rounds 5 --rows 65536
    python benchmarks/dump_ceiling.py --quick          # smoke run: zero-cost dump == normal dump

The real ``run_dump`` path runs unchanged (Ray actors, ``StoreWriter``, completion records).
Only the teacher and the inputs are free:

* **Inputs** are pre-decoded tensors: the in-memory ``synthetic`` dataset (1,000 classes, 8-d
  inputs, real labels), which the predictor slices without a decode step.
* **Teacher** ``benchmarks.dump_ceiling:zero_cost_teacher`` returns precomputed ImageNet-like
  outputs: 1,000 logits (``2*N(0,1) + 6*onehot``, as in ``store_io.py``) and 2,048-d non-negative
  penultimate features (a ResNet-50's pooled ReLU outputs are non-negative), looked up per row
  from a pool of 4,096 rows by the low bits of the row's first input. Its classifier is a real
  ``nn.Linear`` (stored as the classifier weight) whose forward returns the looked-up logits,
  so feature hooks and the classifier checks work as for any teacher.

Store: k = 10, T = 1, 2, 4, 8, the label logit, and 2,048-d fp16 penultimate features (on / off).
Each worker gets one torch thread and one blosc thread (``threads_per_worker=1``); configurations
(features on/off x 1, 2 workers x 256-, 1,024-row units) are interleaved within each round, and
the 1-minute load average is recorded next to every run (the machine may be shared).
"Rows/s per worker" is the steady rate: from the first unit of every worker to the last unit,
divided by the number of workers.

The per-part breakdown is measured in this process (no Ray), on the same predictor and writer
code, as CPU time per row (``time.process_time``, every thread of the process), so it is far
less sensitive to other load than the rates: see :func:`breakdown`. The worker and driver
processes' CPU time during the Ray dump is read from ``/proc`` and compared with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 1000
FEATURE_DIM = 2048
POOL = 4096  # distinct precomputed rows; a power of two (rows are picked by input bits)
K = 10
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
TEACHER = "benchmarks.dump_ceiling:zero_cost_teacher"


# ----------------------------------------------------------------------------- zero-cost teacher


class _LookupClassifier(nn.Linear):
    """A real ``nn.Linear`` (its weight is the stored classifier) whose output is the precomputed
    logits of the rows its teacher just looked up."""

    def __init__(self, dim: int, classes: int, table: torch.Tensor) -> None:
        super().__init__(dim, classes)
        self.register_buffer("table", table, persistent=False)
        self.rows: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, self.rows)


class ZeroCostTeacher(nn.Module):
    """Returns precomputed logits and penultimate features for each row: row ``i`` of the
    dataset maps to pool row ``bits(x_i[0]) % POOL``, so the outputs depend only on the input."""

    def __init__(self, num_classes: int = CLASSES, dim: int = FEATURE_DIM, pool: int = POOL, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        logits = 2.0 * rng.standard_normal((pool, num_classes), dtype=np.float32)
        logits[np.arange(pool), rng.integers(0, num_classes, pool)] += 6.0
        features = np.maximum(rng.gamma(1.0, 0.5, (pool, dim)).astype(np.float32) - 0.05, 0.0)
        self.register_buffer("pool", torch.from_numpy(features), persistent=False)
        self.fc = _LookupClassifier(dim, num_classes, torch.from_numpy(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1)[:, 0].contiguous().view(torch.int32) & (self.pool.shape[0] - 1)
        self.fc.rows = rows.long()
        # the features are looked up only when a hook records them (a dump with features)
        recorded = bool(self.fc._forward_pre_hooks)
        return self.fc(self.pool.index_select(0, self.fc.rows) if recorded else self.pool[:1])


def zero_cost_teacher(num_classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)  # the classifier weight
    return ZeroCostTeacher(num_classes)


def dataset_spec(rows: int) -> str:
    return f"synthetic:num_classes={CLASSES},superclasses=4,dim=8,difficulty=0,train_samples={rows}"


def config_for(out: str, rows: int, features: bool, rows_per_unit: int):
    from softlabels.pipelines.predictor import DumpConfig

    return DumpConfig(
        teacher=TEACHER, dataset=dataset_spec(rows), out=out, k=K, temperatures=TEMPERATURES,
        feature_layers=("penultimate",) if features else (), batch_size=256, threads_per_worker=1,
        rows_per_shard=rows_per_unit, rows_per_chunk=min(rows_per_unit, 1024),
    )


# ----------------------------------------------------------------------------- Ray dump runs


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ray_dump(out: str, rows: int, features: bool, rows_per_unit: int, workers: int) -> dict:
    """One real dump; steady rows/s per worker and CPU seconds per row of workers and driver."""
    import ray

    from softlabels.pipelines.dump import run_dump

    marks: list[tuple[float, int]] = []
    pids: list[int] = []
    cpu: dict[str, float] = {}

    def on_actors(actors) -> None:
        pids.extend(ray.get([a.pid.remote() for a in actors]))
        cpu["workers"] = sum(map(_proc_cpu, pids))
        cpu["driver"] = time.process_time()

    def on_unit(unit: int, n: int) -> None:
        marks.append((time.perf_counter(), n))
        with contextlib.suppress(FileNotFoundError):  # the workers are gone once the dump ends (Ray shut down)
            cpu["workers_last"] = sum(map(_proc_cpu, pids))

    load = _load()
    result = run_dump(config_for(out, rows, features, rows_per_unit), workers=workers, on_unit=on_unit,
                      on_actors=on_actors)
    driver_cpu = time.process_time() - cpu["driver"]  # includes finalize (summary over the store)
    worker_cpu = cpu["workers_last"] - cpu["workers"]  # read at the last unit, while the workers still run
    first = marks[workers - 1][0]
    steady = sum(n for _, n in marks[workers:]) / (marks[-1][0] - first)
    return {"per_worker": steady / workers, "load": load, "worker_us_per_row": worker_cpu / rows * 1e6,
            "driver_us_per_row": driver_cpu / rows * 1e6, "bytes_per_sample": result.bytes_per_sample}


# ----------------------------------------------------------------------------- in-process breakdown


class _Clock:
    """CPU seconds (whole process) spent inside wrapped callables, by part."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._depth = 0

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.parts[part] = self.parts.get(part, 0.0) + time.process_time() - t0

        return timed


def breakdown(tmp: str, rows: int, features: bool, rows_per_unit: int) -> dict[str, float]:
    """CPU microseconds per row of each part of a worker's unit (predict, then write), and of
    the driver's completion record, measured in this process on the product's own code."""
    import numcodecs.blosc

    from softlabels.pipelines import predictor as predictor_module
    from softlabels.pipelines.dump import plan_store
    from softlabels.pipelines.predictor import TeacherPredictor
    from softlabels.stores import writer as writer_module
    from softlabels.stores.writer import StoreWriter

    config = config_for(str(Path(tmp) / "breakdown.zarr"), rows, features, rows_per_unit)
    predictor = TeacherPredictor(config, device=torch.device("cpu"))  # sets 1 torch + 1 blosc thread
    schema, weight, bias = plan_store(config, predictor)
    writer = StoreWriter.create(config.out, schema, classifier_weight=weight, classifier_bias=bias, overwrite=True)
    clock = _Clock()
    saved = (predictor_module.summarize_logits, writer_module.unit_digest, predictor.forward, writer.prepare_unit)
    predictor_module.summarize_logits = clock.wrap("top-k + normalisers", saved[0])
    writer_module.unit_digest = clock.wrap("digests (sha256)", saved[1])
    predictor.forward = clock.wrap("teacher (zero-cost lookup)", saved[2])
    writer.prepare_unit = clock.wrap("validate + cast", saved[3])
    codecs = _codecs(schema)
    total = {"predict": 0.0, "write": 0.0, "compress": 0.0, "record": 0.0}
    try:
        units = schema.num_units
        for unit in range(units):
            start, stop = schema.unit_range(unit)
            t0 = time.process_time()
            fields = predictor.predict_unit(start, stop)
            t1 = time.process_time()
            digests = writer.write_unit(unit, fields)
            t2 = time.process_time()
            writer.mark_complete(unit, digests)
            t3 = time.process_time()
            prepared = saved[3](unit, fields)  # outside the clock: the same arrays, compressed alone
            t4 = time.process_time()
            for name, data in prepared.items():
                codecs[name].encode(data)
            total["compress"] += time.process_time() - t4
            total["predict"] += t1 - t0
            total["write"] += t2 - t1
            total["record"] += t3 - t2
    finally:
        predictor_module.summarize_logits, writer_module.unit_digest = saved[0], saved[1]
    p = clock.parts
    us = 1e6 / rows
    out = {
        "teacher (zero-cost lookup)": p["teacher (zero-cost lookup)"] * us,
        "top-k + normalisers": p["top-k + normalisers"] * us,
        "to host + concatenate": (total["predict"] - p["teacher (zero-cost lookup)"] - p["top-k + normalisers"]) * us,
        "validate + cast": p["validate + cast"] * us,
        "digests (sha256)": p["digests (sha256)"] * us,
        "compression (blosc-zstd)": total["compress"] * us,
        "zarr writes, less compression": (total["write"] - p["validate + cast"] - p["digests (sha256)"]
                                          - total["compress"]) * us,
        "completion record (driver)": total["record"] * us,
    }
    numcodecs.blosc.set_nthreads(1)
    return out


def _codecs(schema) -> dict:
    """numcodecs Blosc objects with each per-sample array's settings (docs/FORMAT.md)."""
    from numcodecs import Blosc

    from softlabels.stores import format as fmt

    out = {}
    for spec in schema.per_sample_arrays():
        blosc = fmt.codecs_for(spec)["compressors"][0]
        shuffle = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[blosc.shuffle.value]
        out[spec.name] = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffle, blocksize=blosc.blocksize)
    return out


# ----------------------------------------------------------------------------- quick identity check


def _reference_store(path: str, dumped: str) -> None:
    """A normal in-process store of the same logits: the teacher run on every input, then
    ``write_store_from_logits`` with the dumped store's metadata and layout."""
    from softlabels.datasets import load_dataset
    from softlabels.stores import open_store
    from softlabels.stores.from_logits import write_store_from_logits
    from softlabels.teachers import FeatureRecorder, classifier_parameters, load_teacher

    meta = open_store(dumped).meta
    schema = meta.schema
    dataset, info = load_dataset(meta.dataset["spec"], meta.dataset["split"])
    teacher = load_teacher(TEACHER, None, input_shape=info.input_shape, num_classes=info.num_classes)
    with torch.inference_mode(), FeatureRecorder(teacher.model, {"penultimate": "penultimate"}) as rec:
        logits = teacher.model(dataset.inputs)
        feats = rec.features["penultimate"]
    weight, bias = classifier_parameters(teacher)
    write_store_from_logits(
        path, logits.numpy(), k=schema.k, temperatures=schema.temperatures, labels=info.labels,
        features={"penultimate": feats.numpy()} if schema.features else None,
        classifier_weight=weight, classifier_bias=bias, teacher=meta.teacher, dataset=meta.dataset,
        rows_per_shard=schema.rows_per_shard, rows_per_chunk=schema.rows_per_chunk,
    )


_TIMING_KEYS = ("created", "completed", "run_id", "store_digest")  # + each run's own id, and the digest over all of it


def store_differences(a: str, b: str) -> list[str]:
    """Files that differ between two stores, byte for byte, except the timing metadata of the
    root document (``created``, ``completed``, ``summary.dump``), the run's id (``run_id``) and the
    digests that cover them (``store_digest``, the root's own digest)."""
    files_a = {p.relative_to(a).as_posix() for p in Path(a).rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in Path(b).rglob("*") if p.is_file()}
    diffs = [f"only in one store: {name}" for name in sorted(files_a ^ files_b)]
    for name in sorted(files_a & files_b):
        da, db = (Path(a) / name).read_bytes(), (Path(b) / name).read_bytes()
        if name == "zarr.json":
            da, db = (json.dumps(_untimed(json.loads(d)), sort_keys=True).encode() for d in (da, db))
        if da != db:
            diffs.append(name)
    return diffs


def _untimed(doc: dict) -> dict:
    meta = doc["attributes"]["softlabels"]
    for key in _TIMING_KEYS:
        meta.pop(key, None)
    meta["summary"].pop("dump", None)
    meta.get("metadata_sha256", {}).pop("zarr.json", None)  # the root's own digest covers its timestamps
    return doc


def quick(tmp: str, workers: int = 2) -> list[str]:
    """Zero-cost Ray dump (features on, 4 units of 512 rows) vs a normal store of the same logits."""
    from softlabels.pipelines.dump import run_dump

    dumped, reference = str(Path(tmp) / "dumped.zarr"), str(Path(tmp) / "reference.zarr")
    run_dump(config_for(dumped, 2048, True, 512), workers=workers)
    _reference_store(reference, dumped)
    return store_differences(dumped, reference)


# ----------------------------------------------------------------------------- main


def _init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray workers unpickle the teacher: they import benchmarks.dump_ceiling from the repository root.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows-per-unit", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--features", choices=["on", "off", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="smoke run: check the zero-cost dump's store against a normal one")
    p.add_argument("--keep", metavar="DIR", help="with --quick: write both stores under DIR and keep them")
    args = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    _init_ray()
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            diffs = quick(args.keep or tmp)
        if diffs:
            print(f"zero-cost dump differs from a normal store of the same logits: {', '.join(diffs)}")
            return 1
        print("zero-cost dump == normal store of the same logits (every file byte for byte, bar timing metadata)")
        return 0
    feature_modes = {"on": [True], "off": [False], "both": [True, False]}[args.features]
    configs = [(f, u, w) for f in feature_modes for u in args.rows_per_unit for w in args.workers]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    parts: dict[tuple, list[dict]] = {(f, u): [] for f in feature_modes for u in args.rows_per_unit}
    print(f"uptime at start: {os.popen('uptime').read().strip()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for f, u, w in order:
                out = str(Path(tmp) / f"r{r}-{f}-{u}-{w}.zarr")
                run = ray_dump(out, args.rows, f, u, w)
                runs[(f, u, w)].append(run)
                print(f"round {r + 1} features {'on' if f else 'off'} {u}-row units {w} worker(s): "
                      f"{run['per_worker']:,.0f} rows/s per worker (load {run['load']:.2f}); CPU/row: workers "
                      f"{run['worker_us_per_row']:.1f} us, driver {run['driver_us_per_row']:.1f} us", flush=True)
            for f, u in parts:
                parts[(f, u)].append(breakdown(tmp, min(args.rows, 16384), f, u))
    med = statistics.median
    print(f"\n$ python benchmarks/dump_ceiling.py --rows {args.rows} --rounds {args.rounds} "
          f"--rows-per-unit {' '.join(map(str, args.rows_per_unit))} --workers {' '.join(map(str, args.workers))} "
          f"--features {args.features}")
    print(f"uptime at end: {os.popen('uptime').read().strip()}")
    print("features | rows/unit | workers | rows/s per worker, median [min, max] | 1-min load per run | "
          "worker CPU us/row | driver CPU us/row | scaling vs 1 worker")
    for f, u, w in configs:
        rs = runs[(f, u, w)]
        rates = [x["per_worker"] for x in rs]
        loads = ", ".join(f"{x['load']:.1f}" for x in rs)
        scale = ""
        if w != args.workers[0] and (f, u, args.workers[0]) in runs:
            ratios = [w * x["per_worker"] / (args.workers[0] * y["per_worker"]) for x, y in zip(rs, runs[(f, u, args.workers[0])])]
            scale = f"{med(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
        print(f"{'on' if f else 'off'} | {u} | {w} | {med(rates):,.0f} [{min(rates):,.0f}, {max(rates):,.0f}] | "
              f"{loads} | {med(x['worker_us_per_row'] for x in rs):.1f} | "
              f"{med(x['driver_us_per_row'] for x in rs):.1f} | {scale}")
    print("\nCPU microseconds per row, in-process, median of rounds:")
    keys = list(next(iter(parts.values()))[0])
    print("part | " + " | ".join(f"features {'on' if f else 'off'}, {u}-row units" for f, u in parts))
    for key in keys:
        print(f"{key} | " + " | ".join(f"{med(b[key] for b in bs):.1f}" for bs in parts.values()))
    sums = [med(sum(b.values()) for b in bs) for bs in parts.values()]
    print("total | " + " | ".join(f"{s:.1f} (= {1e6 / s:,.0f} rows/s of one core)" for s in sums))
    for (f, u), bs in parts.items():
        worker = {k: med(b[k] for b in bs) for k in keys if "driver" not in k}
        slowest = max(worker, key=worker.get)
        print(f"features {'on' if f else 'off'}, {u}-row units: slowest part {slowest} ({worker[slowest]:.1f} us/row)")
    print(f"store: {runs[configs[0]][-1]['bytes_per_sample']:.0f} B/sample (first configuration)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
