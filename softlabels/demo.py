"""``make demo``: the whole story on mnist1d, offline, in a few minutes on 2 CPU cores.

1. train a CNN teacher;
2. dump it with Ray (2 workers) over the labelled train split and over 20,000 extra unlabelled
   samples (a transfer set) -- each command printed as you would type it;
3. inspect and verify the stores;
4. train students from the stores (no teacher in memory) and print one comparison table;
5. write ``report.html``: the stores and the student runs, with figures (``softlabels report``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()


def run(*args: str) -> None:
    """Run a softlabels command exactly as a user would, echoing it first."""
    console.print(f"[bold cyan]$ softlabels {' '.join(shlex.quote(a) for a in args)}[/]")
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    r = subprocess.run([sys.executable, "-m", "softlabels.cli.app", *args], env=env)
    if r.returncode != 0:
        raise SystemExit(f"demo step failed (exit {r.returncode}): softlabels {' '.join(args)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="working directory (recreated stores inside)")
    p.add_argument("--seeds", type=int, default=3, help="student seeds per method")
    p.add_argument("--epochs", type=int, default=60, help="student epochs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = "mnist1d"
    teacher = out / "teacher.pt"
    train_store, transfer_store = out / "mnist1d-train.zarr", out / "mnist1d-transfer.zarr"

    console.rule("1. teacher")
    if not teacher.exists():
        run("teacher", "fit", "--dataset", dataset, "--arch", "cnn", "--epochs", "40", "--seed", "0",
            "--out", str(teacher))
    else:
        console.print(f"reusing {teacher}")

    console.rule("2. dump with Ray: train split, then 20,000 unlabelled transfer samples")
    common = ["--teacher", "builtin:cnn", "--weights", str(teacher), "--dataset", dataset, "--workers", "2",
              "--k", "10", "--temperatures", "1,2,4,8", "--overwrite"]
    run("dump", *common, "--split", "train", "--out", str(train_store))
    run("dump", *common, "--split", "transfer", "--out", str(transfer_store))

    console.rule("3. inspect")
    run("info", str(train_store))
    run("verify", str(transfer_store))

    try:
        from softlabels.demo_students import run_students
    except ModuleNotFoundError:
        console.print("student training is not part of this build yet")
        return
    console.rule("4. students from the stores (the teacher is never loaded)")
    results = run_students(dataset, train_store, transfer_store, seeds=args.seeds, epochs=args.epochs, out=out)
    (out / "results.json").write_text(json.dumps(results, indent=2))

    console.rule("5. report: the stores and the student runs, in one HTML file")
    report = out / "report.html"
    run("report", str(train_store), str(transfer_store), "--runs", str(out / "runs"), "--out", str(report))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}")
    console.print(f"report: {report.resolve()}  (open it in a browser; it is one self-contained file)")


if __name__ == "__main__":
    main()
