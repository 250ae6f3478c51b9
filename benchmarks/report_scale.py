"""`softlabels report` on a large store: wall time of each part, the whole command under a minute.

    python benchmarks/report_scale.py                          # 1M rows, C=1000, k=10 (the BENCHMARKS.md row)
    python benchmarks/report_scale.py --rows 200000 --classes 100 --compare
    python benchmarks/report_scale.py --keep bench-out/report   # keep the 1M-row store, reuse it next time

Teacher-like logits, z = 2·N(0,1) + 6·onehot(y) with a few systematically confused class pairs,
are generated in blocks into a float32 memory map (4 GB at 1M x 1000, so the process never holds
them in RAM at once) and written with ``softlabels.stores.from_logits.write_store_from_logits``
(k=10, T = 1,2,4,8, fp16 values, labels). Then the report is built as the CLI builds it, timed
per part: the one-pass statistics, the verify re-read, the figures and HTML. ``--compare`` adds a
second store (the same logits plus noise, k=5) and times the comparison pass.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from softlabels.report.build import _verify_status, open_for_report
from softlabels.report.compare import compare_stores
from softlabels.report.html import Section, render_html
from softlabels.report.stats import compute_store_stats, default_temperature
from softlabels.stores.from_logits import write_store_from_logits

TEMPS = (1.0, 2.0, 4.0, 8.0)


def make_logits(path: Path, rows: int, classes: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    labels = np.random.default_rng(0).integers(0, classes, rows)
    z = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, classes))
    step = 65_536
    for start in range(0, rows, step):
        y = labels[start : start + step]
        block = 2.0 * g.standard_normal((y.size, classes), dtype=np.float32)
        block[np.arange(y.size), y] += 6.0
        block[np.arange(y.size), (y // 2) * 2] += 2.0  # pairs (2i, 2i+1): the odd class looks like its even twin
        if noise:
            block += noise * g.standard_normal(block.shape, dtype=np.float32)
        z[start : start + y.size] = block
    z.flush()
    return z, labels


def timed(label: str, fn, times: dict):
    """Wall and CPU seconds of ``fn`` (CPU time shows the work when the shared machine is busy)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    times[label] = time.perf_counter() - t0
    print(f"{label:<34} {times[label]:7.1f} s wall {time.process_time() - c0:7.1f} s CPU", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--compare", action="store_true", help="also time a second store and the comparison")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--keep", default=None, help="build the stores here and keep them; reuse them when present")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        build: dict[str, float] = {}
        paths = []
        for i in range(2 if args.compare else 1):
            if (root / f"store{i}.zarr" / "zarr.json").exists():
                print(f"reusing {root / f'store{i}.zarr'}")
                paths.append(root / f"store{i}.zarr")
                continue
            z, labels = timed(f"generate logits {i + 1}", lambda: make_logits(root / f"z{i}.npy", args.rows,
                                                                             args.classes, seed=i, noise=1.0 * i), build)
            path = root / f"store{i}.zarr"
            timed(f"write store {i + 1}", lambda: write_store_from_logits(
                path, z, k=args.k if i == 0 else max(1, args.k // 2), temperatures=TEMPS, labels=labels,
                teacher={"spec": "bench"}, dataset={"spec": "bench", "split": "train"}), build)
            del z
            (root / f"z{i}.npy").unlink()
            paths.append(path)
        print(f"store: {args.rows:,} rows, C={args.classes}, k={args.k}, T={TEMPS}", flush=True)

        times: dict[str, float] = {}
        t_all = time.perf_counter()
        stores = timed("open", lambda: [open_for_report(str(p)) for p in paths], times)
        t = default_temperature(stores)
        stats = timed("statistics (one pass)", lambda: compute_store_stats(stores[0], t), times)
        timed("verify (re-read every chunk)", lambda: _verify_status(stores[0], None), times)
        if args.compare:
            timed("statistics of store 2", lambda: compute_store_stats(stores[1], t), times)
            timed("comparison pass", lambda: compare_stores(stores[0], stores[1], t), times)
        from softlabels.report.build import _store_section

        def render() -> int:
            section = _store_section(0, stores[0], stats, "ok")
            return len(render_html("bench", "", [Section("s", "s", figures=section.figures)]))

        timed("figures + HTML", render, times)
        total = time.perf_counter() - t_all
        print(f"{'parts total':<34} {total:7.1f} s")
        cmd = [sys.executable, "-m", "softlabels.cli.app", "report", *map(str, paths), "--out", str(root / "r.html")]
        t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"{'softlabels report (CLI, end to end)':<34} {time.perf_counter() - t0:7.1f} s wall {cpu:7.1f} s CPU"
              f"   (target < 60 s wall; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print(f"ECE {stats.ece:.4f}, teacher top-1 {stats.accuracy:.4f}, top-k mass T=1 {stats.mass_mean(1.0):.4f}")


if __name__ == "__main__":
    main()
