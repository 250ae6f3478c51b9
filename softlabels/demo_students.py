"""The student half of ``make demo``: every method trained from the stores, several seeds,
one comparison table. Runs go to a pool of two single-threaded processes (two cores, no thread
oversubscription); each method's equivalent ``softlabels train`` command is printed so it can
be rerun by hand.

Two regimes, reported separately and honestly:

* **train split only** (mnist1d's 4,000 labelled samples): the students see the same inputs
  as the CE baseline; KD's gain here is small on mnist1d (the teacher fits its training set,
  so its train-set targets are nearly one-hot);
* **transfer set** (4,000 labelled + 20,000 unlabelled samples the teacher labelled once): the
  classic use of an offline store, where the teacher's knowledge reaches inputs the labels
  never covered.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import re
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from softlabels.stores import open_store
from softlabels.train import train_student

console = Console()

#: (label, method, stores: "train" | "train+transfer" | None, options)
RUNS: list[tuple[str, str, str | None, dict[str, Any]]] = [
    ("CE (no teacher)", "ce", None, {}),
    ("LS eps=0.1", "ls", None, {}),
    ("KD T=4", "kd", "train", {"temperature": 4.0}),
    ("KD-topk k=3 T=4", "kd-topk", "train", {"temperature": 4.0, "k": 3}),
    ("KD-pt T=4", "kd-pt", "train", {"temperature": 4.0}),
    ("hint (FitNets, joint)", "hint", "train", {}),
    ("KD T=1, + transfer set", "kd", "train+transfer", {"temperature": 1.0, "hparams": {"ce_weight": 0.0, "kd_weight": 1.0}}),
    ("KD-topk k=3 T=1, + transfer set", "kd-topk", "train+transfer",
     {"temperature": 1.0, "k": 3, "hparams": {"ce_weight": 0.0, "kd_weight": 1.0}}),
]


def method_flags(opts: dict[str, Any]) -> list[str]:
    """``softlabels train`` flags for a method's options ``{"temperature", "k", "hparams"}`` (each optional);
    also used by benchmarks/tang2020.py, so both print the command a user would type the same way."""
    flags: list[str] = []
    if "temperature" in opts:
        flags += ["--temperature", f"{opts['temperature']:g}"]
    if "k" in opts:
        flags += ["--k", str(opts["k"])]
    for key, value in opts.get("hparams", {}).items():
        flags += ["--hparam", f"{key}={value:g}"]
    return flags


def _command(method: str, stores: list[str], dataset: str, epochs: int, opts: dict[str, Any]) -> str:
    parts = ["softlabels", "train", "--dataset", dataset, "--student", "builtin:mlp", "--method", method]
    for s in stores:
        parts += ["--store", s]
    parts += method_flags(opts)
    parts += ["--epochs", str(epochs), "--seed", "0", "--out", "runs/" + method + "/seed0"]
    return " ".join(shlex.quote(p) for p in parts)


def _train_one(job: tuple) -> dict:
    """One (method, seed) run in a pool process: one torch thread, so two runs fill two cores.
    Its student.pt and metrics.json stay in ``run_dir`` (``softlabels report --runs`` reads them)."""
    torch.set_num_threads(1)
    stores, dataset, method, seed, epochs, opts, run_dir = job
    return train_student(stores or None, dataset, "builtin:mlp", method, epochs=epochs, seed=seed,
                         out_dir=run_dir, progress=False, temperature=opts.get("temperature"),
                         k=opts.get("k"), hparams=opts.get("hparams"))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def run_students(dataset: str, train_store: Path, transfer_store: Path, *, seeds: int, epochs: int, out: Path,
                 processes: int = 2) -> list[dict]:
    train, transfer = open_store(train_store), open_store(transfer_store)
    sizes = {"train": train.bytes_on_disk() / train.num_samples,
             "train+transfer": (train.bytes_on_disk() + transfer.bytes_on_disk()) / (train.num_samples + transfer.num_samples)}
    runs_dir = out / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)  # runs of an earlier demo (other seeds or epochs) would mix in
    plan = []
    for label, method, which, opts in RUNS:
        stores = {None: [], "train": [str(train_store)], "train+transfer": [str(train_store), str(transfer_store)]}[which]
        jobs = [(stores, dataset, method, seed, epochs, opts, str(runs_dir / _slug(label) / f"seed{seed}"))
                for seed in range(seeds)]
        plan.append((label, method, which, opts, jobs))
    results = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        futures = [[pool.submit(_train_one, job) for job in jobs] for *_, jobs in plan]
        for (label, method, which, opts, jobs), runs in zip(plan, futures):
            console.print(f"[bold cyan]$ {_command(method, jobs[0][0], dataset, epochs, opts)}[/]  [dim](x{seeds} seeds)[/]")
            metrics = [f.result() for f in runs]
            accs = [m["test_accuracy"] for m in metrics]
            results.append({
                "run": label, "method": method, "stores": which or "none", "seeds": seeds, "epochs": epochs,
                "accuracies": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if seeds > 1 else 0.0,
                "seconds_per_run": statistics.mean(m["wall_seconds"] for m in metrics),
                "store_bytes_per_sample": sizes.get(which), "options": opts,
            })
            console.print(f"    test accuracy {100 * results[-1]['mean']:.1f} ± {100 * results[-1]['std']:.1f} %")
    _print_table(results)
    return results


def _print_table(results: list[dict]) -> None:
    base = results[0]
    table = Table(title="mnist1d students (40-100-100-10 MLP, Adam, mean ± std over seeds)")
    for col in ("student training", "test acc %", "vs CE (pts)", "beats CE by > both stds?", "s / run", "store B/sample"):
        table.add_column(col, justify="right" if col != "student training" else "left")
    for r in results:
        diff = 100 * (r["mean"] - base["mean"])
        spread = 100 * (r["std"] + base["std"])  # both runs' seed-to-seed spread
        verdict = "-" if r is base else ("yes" if diff > spread else "no")
        size = f"{r['store_bytes_per_sample']:.0f}" if r["store_bytes_per_sample"] else "-"
        table.add_row(r["run"], f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}", f"{diff:+.1f}" if r is not base else "",
                      verdict, f"{r['seconds_per_run']:.1f}", size)
    console.print(table)
