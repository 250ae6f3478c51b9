"""CLI start-up time: ``softlabels --help`` and ``softlabels info STORE --json``, this tree
against a baseline tree (e.g. an export of main before the lazy imports), interleaved.

    git archive 8f75b9d | tar -x -C /tmp/base
    nice -n 5 python benchmarks/cli_startup.py --baseline /tmp/base --runs 10

Each run is a fresh process of the installed ``softlabels`` entry point with PYTHONPATH set to
one tree; runs alternate between the trees so that machine load hits both alike. Prints the
median, min and max wall seconds of each (command, tree).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def make_store(path: Path) -> None:
    from softlabels.stores.from_logits import write_store_from_logits

    g = np.random.default_rng(0)
    labels = g.integers(0, 10, 2000)
    logits = g.normal(0, 2, (2000, 10)).astype(np.float32)
    write_store_from_logits(path, logits, k=5, temperatures=(1, 4), labels=labels,
                            teacher={"spec": "bench:logits"}, dataset={"spec": "bench:data", "split": "train"})


def timed(cmd: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a softlabels source tree to compare against")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    exe = shutil.which("softlabels") or sys.exit("the softlabels entry point is not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "s.zarr"
        make_store(store)
        commands = {"softlabels --help": [exe, "--help"], "softlabels info s.zarr --json": [exe, "info", str(store), "--json"]}
        trees = {"baseline": args.baseline.resolve(), "this tree": HERE}
        times = {(c, t): [] for c in commands for t in trees}
        for name, tree in trees.items():  # warm the file cache once per tree
            for cmd in commands.values():
                timed(cmd, tree)
        for _ in range(args.runs):
            for c, cmd in commands.items():
                for t, tree in trees.items():
                    times[(c, t)].append(timed(cmd, tree))
    print(f"| command | tree | median s | min s | max s | runs |")
    print("|---|---|---|---|---|---|")
    for (c, t), xs in times.items():
        print(f"| `{c}` | {t} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} | {len(xs)} |")


if __name__ == "__main__":
    main()
