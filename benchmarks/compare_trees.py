"""Run one benchmark script from two source trees, alternating, and compare its rows.

    python benchmarks/compare_trees.py --base /work/wt-base --new . --rounds 5 \\
        -- benchmarks/store_io.py --rows 200000 --batches 500

Each round runs the script once from each tree, in a fresh subprocess with ``PYTHONPATH`` set
to that tree and the tree as working directory (each tree runs its *own* copy of the script, so
the two may import different module paths). The order alternates every round (base, new; new,
base; ...), so a load trend on a shared machine hits both trees alike. The environment is passed
through (set ``OMP_NUM_THREADS`` outside). ``--clock cpu`` runs the script with
``time.perf_counter`` replaced by ``time.process_time`` (the process's CPU time, all threads): on
a loaded machine that leaves out the time the script waits for a core, so its rates become CPU
costs rather than latencies (cache misses other processes cause still count).

The script's rows are read from its text output: a ``|``-separated line whose first cell is a
label and whose other cells are numbers, or a line ``label<2+ spaces>numbers...``; ``--section``
names the lines that head a group of rows (their text prefixes the labels). Rows are matched by
label across trees. Printed per row and numeric column: the median over rounds from each tree,
each tree's spread over rounds (max/min - 1: the noise a difference has to beat) and the ratio
new / base of the medians, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
_SPACED_ROW = re.compile(r"^(\S.*?)\s{2,}([-+]?\d.*)$")


def _numbers(text: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in _NUMBER.finditer(text)]


def parse_rows(output: str, section: re.Pattern | None) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """``({label: numbers}, {label: column names})`` from a benchmark's text output."""
    rows: dict[str, list[float]] = {}
    names: dict[str, list[str]] = {}
    prefix, header, previous = "", None, ""
    for line in output.splitlines():
        if section is not None and section.search(line):
            prefix = section.search(line).group(0) + ": "
            continue
        if set(line.strip()) == {"-"}:  # a rule under a header
            header = re.split(r"\s{2,}", previous.strip())[1:]
        elif " | " in line:
            cells = [c.strip() for c in line.split(" | ")]
            if len(cells) > 1 and all(_NUMBER.fullmatch(c) for c in cells[1:]):
                label = prefix + cells[0]
                rows[label] = [_numbers(c)[0] for c in cells[1:]]
                if header and len(header) == len(rows[label]):
                    names[label] = header
            else:
                header = cells[1:]
        else:
            m = _SPACED_ROW.match(line)
            if m and _numbers(m.group(2)):
                label = prefix + m.group(1).strip()
                rows[label] = _numbers(m.group(2))
                if header and len(header) == len(rows[label]):
                    names[label] = header
        previous = line
    return rows, names


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


_CPU_CLOCK = (
    "import runpy, sys, time; time.perf_counter = time.process_time; "
    "sys.path.insert(0, sys.argv[1].rpartition('/')[0] or '.'); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run(tree: Path, script: str, args: list[str], clock: str) -> tuple[str, float, float]:
    """(stdout, wall seconds, 1-minute load average at the start) of one run from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    launch = [sys.executable, script] if clock == "wall" else [sys.executable, "-c", _CPU_CLOCK, script]
    done = subprocess.run([*launch, *args], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{script} failed in {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout, seconds, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the reference source tree (e.g. a worktree of main)")
    ap.add_argument("--new", type=Path, default=Path("."), help="the tree under test")
    ap.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: the script's time.perf_counter becomes the process's CPU time (a loaded machine)")
    ap.add_argument("--section", default=None, help="regex of the lines that head a group of rows")
    ap.add_argument("--columns", default=None, help="comma-separated 0-based numeric columns to show (default all)")
    ap.add_argument("--runs", action="store_true", help="also list every run's value (base runs; new runs)")
    ap.add_argument("--names", default=None, help="comma-separated column names (default: the script's header)")
    ap.add_argument("script", help="the script, relative to each tree")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    trees = {"base": a.base.resolve(), "new": a.new.resolve()}
    section = re.compile(a.section) if a.section else None
    results: dict[str, list[dict[str, list[float]]]] = {"base": [], "new": []}
    names: dict[str, list[str]] = {}
    loads = []
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    for rnd in range(a.rounds):
        for which in ("base", "new") if rnd % 2 == 0 else ("new", "base"):
            out, seconds, load = run(trees[which], a.script, args, a.clock)
            rows, row_names = parse_rows(out, section)
            if not rows:
                sys.exit(f"no rows found in the output of {a.script} from {trees[which]}:\n{out[-2000:]}")
            results[which].append(rows)
            names.update(row_names)
            loads.append(load)
            print(f"round {rnd + 1} {which:4s} ({trees[which]}): {seconds:.0f} s, load average {load:.1f}", flush=True)
    print(f"load average (1 min) at the starts of the runs: {min(loads):.1f}-{max(loads):.1f}")
    labels = [k for k in results["new"][0] if all(k in r for r in results["base"] + results["new"])]
    only = sorted({k for r in results["base"] + results["new"] for k in r} - set(labels))
    keep = None if a.columns is None else [int(c) for c in a.columns.split(",")]
    print()
    runs_head = " base runs; new runs |" if a.runs else ""
    print(f"| row | column | base median | new median | new / base | base spread | new spread |{runs_head}")
    print("|---|---|---|---|---|---|---|" + ("---|" if a.runs else ""))
    for label in labels:
        width = min(len(r[label]) for r in results["base"] + results["new"])
        header = a.names.split(",") if a.names else names.get(label, [])
        for col in range(width) if keep is None else [c for c in keep if c < width]:
            med, spread, values = {}, {}, {}
            for which in ("base", "new"):
                xs = values[which] = [r[label][col] for r in results[which]]
                med[which] = statistics.median(xs)
                spread[which] = max(xs) / min(xs) - 1 if min(xs) > 0 else float("nan")
            name = header[col] if col < len(header) else f"col {col}"
            ratio = med["new"] / med["base"] if med["base"] else float("nan")
            runs = " " + "; ".join(", ".join(_fmt(x) for x in values[w]) for w in ("base", "new")) + " |"
            print(f"| {label} | {name} | {_fmt(med['base'])} | {_fmt(med['new'])} | {ratio:.3f} | "
                  f"{100 * spread['base']:.1f} % | {100 * spread['new']:.1f} % |{runs if a.runs else ''}")
    if only:
        print(f"\nrows in only some runs (not compared): {', '.join(only)}")


if __name__ == "__main__":
    main()
