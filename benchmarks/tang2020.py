"""Reproduce Tang et al. 2020 ("Understanding and Improving Knowledge Distillation"), Table 2:
the synthetic super-class task, through the product's own path, from stores.

For every difficulty M and class similarity tau of the grid:

1. ``softlabels teacher fit`` -- a wide residual MLP teacher (``tangmlp-<W>``) on the train split;
2. ``softlabels dump`` -- its targets over the train split into a store (all C logits, so KD is
   exact; normalisers at T = 1, 2, 4; the classifier weight KD-sim needs; no features);
3. ``softlabels train`` -- a narrow student (``tangmlp-<w>``) from that store, once per method
   and seed, in a pool of single-threaded processes; the teacher is never in memory here.
   Each run is the CLI command printed in ``commands.txt``, executed in-process by the pool
   worker (``softlabels.cli.app``), so what is measured is exactly what a user would type.

Methods (library defaults, not tuned here): CE, LS (eps 0.1), and at T = 4 with CE weight 0.1 and
KD weight 0.9: KD, KD-pt, KD-sim (rho 1), KD-pt+sim and KD-topk at k = 1, 3, C/4 (the first k of
the same store). Two sweeps explain the claims (see BENCHMARKS.md and ``sweep_rows``): KD-pt at T = 1, 2
(where the teacher's confidence on the true class differs), and KD-sim over (T, rho).

Output (``--out``): ``results.json`` (every run), ``results.md`` (the tables and verdicts that
BENCHMARKS.md quotes), ``commands.txt``. ``python benchmarks/tang2020.py --out tang-out``;
``--quick`` is a one-seed, one-setting smoke (a test runs it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from softlabels.demo_students import method_flags

# Tang et al. 2020, Table 2 (teacher / student / KD / KD-pt / KD-sim at three tau, low to high).
PAPER = {
    "teacher": (54.82, 60.60, 61.53),
    "ce": (38.45, 42.81, 47.10),
    "kd": (55.97, 56.95, 57.70),
    "kd-pt": (57.05, 56.99, 56.25),
    "kd-sim": (51.90, 53.69, 57.20),
}


def method_rows(num_classes: int, temperature: float) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, method, options)`` of the main table; options are ``softlabels train`` flags."""
    t = {"temperature": temperature}
    quarter = max(1, num_classes // 4)
    return [
        ("ce", "ce", {}),
        ("ls", "ls", {}),
        ("kd", "kd", t),
        ("kd-pt", "kd-pt", t),
        ("kd-sim", "kd-sim", t),
        ("kd-pt+sim", "kd-pt+sim", t),
        ("kd-topk k=1", "kd-topk", {**t, "k": 1}),
        ("kd-topk k=3", "kd-topk", {**t, "k": 3}),
        (f"kd-topk k={quarter}", "kd-topk", {**t, "k": quarter}),
    ]


def sweep_rows() -> list[tuple[str, str, dict[str, Any], str]]:
    """The explanatory sweeps, ``(label, method, options, taus)`` with ``taus`` "low" (the
    lowest tau only) or "ends" (lowest and highest). KD-pt keeps only the teacher's probability
    on the true class, whose size the temperature sets (mean p_t[y] per T is in the table), so it
    runs at T = 1, 2 (with KD at T = 1 for reference) where its claim is made, at low tau. KD-sim's
    target ``softmax(cos^rho / T)`` is near uniform at T = 4 (cosines lie in [-1, 1]), while the
    teacher's own logits are ``scale * cos`` with a learned scale, so T = 4 / scale matches them:
    KD-sim runs at T = 1, 0.25, 0.1 (rho 1) and rho = 3 at T = 0.1, at both ends of tau."""
    rows: list[tuple[str, str, dict[str, Any], str]] = [
        ("kd T=1", "kd", {"temperature": 1.0}, "low"),
        ("kd-pt T=1", "kd-pt", {"temperature": 1.0}, "low"),
        ("kd-pt T=2", "kd-pt", {"temperature": 2.0}, "low"),
    ]
    for temperature, rho in ((1.0, 1.0), (0.25, 1.0), (0.1, 1.0), (0.1, 3.0)):
        rows.append((f"kd-sim T={temperature:g} rho={rho:g}", "kd-sim",
                     {"temperature": temperature, "hparams": {"rho": rho}}, "ends"))
    return rows


# ------------------------------------------------------------------------------ running steps
def cli(*args: str, log: list[str] | None = None, quiet: bool = False) -> str:
    """Run ``softlabels ARGS`` in a fresh process (teacher fit and dump); returns stdout."""
    command = "softlabels " + " ".join(shlex.quote(a) for a in args)
    if log is not None:
        log.append(command)
    if not quiet:
        print("$ " + command, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-m", "softlabels.cli.app", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step failed (exit {r.returncode}): {command}\n{r.stderr[-2000:]}")
    return r.stdout


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _finished(argv: list[str]) -> bool:
    return (Path(argv[argv.index("--out") + 1]) / "metrics.json").exists()


def run_train(argv: list[str], reuse: bool = False) -> dict[str, Any]:
    """One ``softlabels train`` command, executed in this (single-threaded) pool worker; with
    ``reuse``, a run whose ``metrics.json`` exists is read back instead of retrained."""
    from softlabels.cli.app import app

    out = Path(argv[argv.index("--out") + 1])
    if not (reuse and _finished(argv)):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the one-line summary per run
            app(args=argv, standalone_mode=False)
    metrics = json.loads((out / "metrics.json").read_text())
    return {key: metrics[key] for key in ("seed", "test_accuracy", "best_test_accuracy", "wall_seconds", "steps")}


def train_argv(job: dict[str, Any], cfg: argparse.Namespace) -> list[str]:
    argv = ["train", "--dataset", job["dataset"], "--student", f"builtin:tangmlp-{cfg.student_width}",
            "--method", job["method"], "--epochs", str(cfg.epochs), "--lr", f"{cfg.lr:g}",
            "--batch-size", str(cfg.batch_size), "--seed", str(job["seed"]), "--quiet", "--out", job["run_dir"]]
    opts = job["opts"]
    if job["method"] not in ("ce", "ls"):
        argv[1:1] = ["--store", job["store"]]
    return argv + method_flags(opts)


def dataset_spec(cfg: argparse.Namespace, tau: float, difficulty: int) -> str:
    return (f"synthetic:tau={tau:g},difficulty={difficulty},seed={cfg.data_seed},num_classes={cfg.classes},"
            f"superclasses={cfg.superclasses},dim={cfg.dim},train_samples={cfg.train_samples},"
            f"test_samples={cfg.test_samples},transfer_samples=1")


def teacher_summary(spec: str, weights: Path, store: Path, width: int) -> dict[str, float]:
    """Teacher test accuracy (final epoch) and, from the store, its train accuracy and mean
    probability on the true class at T = 1 and 4 (what KD-pt keeps)."""
    import numpy as np

    from softlabels.datasets import load_dataset
    from softlabels.fit import evaluate_accuracy
    from softlabels.stores import open_store
    from softlabels.teachers import load_teacher

    test, info = load_dataset(spec, "test")
    teacher = load_teacher(f"builtin:tangmlp-{width}", str(weights), input_shape=info.input_shape,
                           num_classes=info.num_classes)
    s = open_store(str(store))
    out = {"test_accuracy": evaluate_accuracy(teacher.model, test),
           "logit_scale": float(teacher.model.classifier.scale.detach())}
    fields = s.read(np.arange(s.num_samples), ["topk_indices", "label_logit", "logsumexp", "labels"], view=0)
    out["train_accuracy"] = float((fields["topk_indices"][:, 0] == fields["labels"]).mean())
    for i, t in enumerate(s.temperatures):
        p_y = np.exp(fields["label_logit"].astype(np.float64) / t - fields["logsumexp"][:, i])
        out[f"mean_p_true_T{t:g}"] = float(p_y.mean())
    return out


# ------------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def effect(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(mean(a) - mean(b), that difference in pooled seed stds)`` (inf when both stds are 0)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    sa = statistics.stdev(a) if len(a) > 1 else 0.0
    sb = statistics.stdev(b) if len(b) > 1 else 0.0
    pooled = math.sqrt((sa * sa + sb * sb) / 2)
    return diff, (diff / pooled if pooled > 0 else math.copysign(math.inf, diff) if diff else 0.0)


def _pct(values: list[float]) -> str:
    m, s = mean_std([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}"


def report(results: dict[str, Any], cfg: argparse.Namespace) -> str:
    """The markdown of ``results.md``: setup, main table, verdicts, sweeps."""
    settings = results["settings"]
    lines = [f"Setup: {results['setup']}", ""]
    for difficulty in cfg.difficulty:
        cols = [s for s in settings if s["difficulty"] == difficulty]
        taus = [s["tau"] for s in cols]
        head = "| method | " + " | ".join(f"τ={t:g} best | τ={t:g} last" for t in taus) + " | paper (low / mid / high τ) |"
        lines += [f"#### Difficulty M = {difficulty} (test accuracy %, mean ± std over {cfg.seeds} seeds)", "", head,
                  "|---|" + "---|" * (2 * len(taus)) + "---|"]
        row = "| teacher (final epoch) | " + " | ".join(
            f"– | {100 * s['teacher']['test_accuracy']:.2f}" for s in cols) + " | " + " / ".join(
            f"{v:.2f}" for v in PAPER["teacher"]) + " |"
        lines.append(row)
        for label in results["labels"]:
            cells = []
            for s in cols:
                runs = s["runs"].get(label)
                cells += [_pct([r["best_test_accuracy"] for r in runs]), _pct([r["test_accuracy"] for r in runs])] if runs else ["–", "–"]
            paper = PAPER.get(label)
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + (" / ".join(f"{v:.2f}" for v in paper) if paper else "–") + " |")
        lines.append("| teacher: train acc. / mean p_t[y] at T=1, 2, 4 / logit scale | " + " | ".join(
            f"{100 * s['teacher']['train_accuracy']:.1f} / " + ", ".join(
                f"{s['teacher'][f'mean_p_true_T{t:g}']:.3f}" for t in (1, 2, 4)) + f" / {s['teacher']['logit_scale']:.1f} | "
            for s in cols) + " – |")
        lines.append("")
        lines += verdicts(cols, results["labels"]) + [""]
        sweeps = [s for s in cols if s.get("sweeps")]
        if sweeps:
            lines += [f"Sweeps (M = {difficulty}; best / last, mean ± std):", "", "| run | " + " | ".join(
                f"τ={s['tau']:g}" for s in sweeps) + " |", "|---|" + "---|" * len(sweeps)]
            labels = list(dict.fromkeys(label for s in sweeps for label in s["sweeps"]))
            for label in labels:
                lines.append(f"| {label} | " + " | ".join(
                    _pct([r["best_test_accuracy"] for r in s["sweeps"][label]]) + " / "
                    + _pct([r["test_accuracy"] for r in s["sweeps"][label]]) if label in s["sweeps"] else "–"
                    for s in sweeps) + " |")
            lines += ["", "Sweep differences (best-of-run, pt; d in pooled seed stds):", ""] + [
                f"- τ={s['tau']:g}: " + "; ".join(sweep_effects(s)) for s in sweeps] + [""]
    return "\n".join(lines)


def sweep_effects(s: dict[str, Any]) -> list[str]:
    """KD-pt vs KD at the same T, and every swept KD-sim vs KD at T = 4 (the main row)."""
    def best(label: str) -> list[float]:
        runs = s["runs"].get(label) or s["sweeps"].get(label) or []
        return [100 * r["best_test_accuracy"] for r in runs]

    pairs = [("kd-pt T=1", "kd T=1"), ("kd-pt", "kd")]
    pairs += [(label, "kd") for label in s["sweeps"] if label.startswith("kd-sim")]
    out = []
    for a, b in pairs:
        if best(a) and best(b):
            diff, d = effect(best(a), best(b))
            out.append(f"{a} − {b if b != 'kd' else 'kd T=4'}: {diff:+.2f} (d = {d:+.1f})")
    return out


def _verdict(d: float, *, at_least: float) -> str:
    return "holds" if d >= at_least else ("does not hold" if d <= -1 else "not resolved (|d| < 1)")


def verdicts(cols: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """The three claims, on best-of-run accuracy (as the paper) and on the last epoch."""
    if len(cols) < 2 or not all("kd" in s["runs"] for s in cols):
        return []
    out = ["| claim | metric | measured (difference, in pooled seed stds d) | verdict |", "|---|---|---|---|"]
    low, high = cols[0], cols[-1]
    for metric in ("best_test_accuracy", "test_accuracy"):
        name = "best" if metric == "best_test_accuracy" else "last"

        def acc(s, label):
            return [100 * r[metric] for r in s["runs"][label]]

        diff, d = effect(acc(low, "kd-pt"), acc(low, "kd"))
        out.append(f"| KD-pt > KD at low τ (τ={low['tau']:g}) | {name} | {diff:+.2f} pt, d = {d:+.1f} | {_verdict(d, at_least=1)} |")
        gap_low = [a - b for a, b in zip(acc(low, "kd-sim"), acc(low, "kd"))]
        gap_high = [a - b for a, b in zip(acc(high, "kd-sim"), acc(high, "kd"))]
        diff, d = effect(gap_high, gap_low)
        _, d_high = effect(acc(high, "kd-sim"), acc(high, "kd"))
        text = (f"KD-sim − KD: {statistics.fmean(gap_low):+.2f} pt at τ={low['tau']:g} → "
                f"{statistics.fmean(gap_high):+.2f} pt at τ={high['tau']:g} (gain d = {d:+.1f}; at high τ d = {d_high:+.1f})")
        gains, catches = d >= 1, d_high > -1
        verdict = {(True, True): "holds", (True, False): "gains, does not catch up",
                   (False, True): "catches up without a gain", (False, False): "does not hold"}[gains, catches]
        out.append(f"| KD-sim gains with τ and catches KD at high τ | {name} | {text} | {verdict} |")
        for label in (label for label in labels if label.startswith("kd-topk")):
            parts, worst = [], math.inf
            for s in cols:
                diff, d = effect(acc(s, label), acc(s, "kd"))
                worst = min(worst, d)
                parts.append(f"τ={s['tau']:g}: {diff:+.2f} ({d:+.1f})")
            out.append(f"| {label.replace('kd-topk', 'KD-topk')} ≥ KD | {name} | {'; '.join(parts)} | "
                       f"{'holds (every d > -1)' if worst > -1 else 'does not hold where d <= -1'} |")
    return out


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tang-out", help="Output directory (teachers, stores, runs, results).")
    p.add_argument("--taus", default="0.1,0.5,0.9", help="Class similarities tau (low to high).")
    p.add_argument("--difficulty", default="2", help="Difficulties M (comma-separated).")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--superclasses", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=5000)
    p.add_argument("--test-samples", type=int, default=5000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30, help="Student epochs.")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, teacher and students (cosine to 0).")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=2, help="Single-threaded student processes.")
    p.add_argument("--no-sweeps", action="store_true", help="Skip the explanatory sweeps.")
    p.add_argument("--sweep-difficulty", type=int, default=None, help="Difficulty the sweeps run at (default: the first).")
    p.add_argument("--sweep-seeds", type=int, default=3, help="Seeds per sweep cell.")
    p.add_argument("--quick", action="store_true",
                   help="Smoke: 1 seed, one tau, 2,000 train / 2,000 test samples, 3 teacher and 10 student epochs, no sweeps.")
    args = p.parse_args(argv)
    args.taus = [float(t) for t in args.taus.split(",")]
    args.difficulty = [int(m) for m in args.difficulty.split(",")]
    if args.quick:
        args.seeds, args.taus, args.difficulty = 1, args.taus[:1], args.difficulty[:1]
        args.train_samples, args.test_samples, args.teacher_epochs, args.epochs = 2000, 2000, 3, 10
        args.no_sweeps = True
    if args.sweep_difficulty is None:
        args.sweep_difficulty = args.difficulty[0]
    return args


def _complete(store: Path) -> bool:
    from softlabels.errors import SoftlabelsError
    from softlabels.stores import open_store

    try:
        return store.exists() and open_store(str(store)).meta.status == "complete"
    except SoftlabelsError:
        return False


def _fit_and_dump(cfg: argparse.Namespace, spec: str, arch: str, weights: Path, store: Path, commands: list[str]) -> None:
    cli("teacher", "fit", "--dataset", spec, "--arch", arch, "--epochs", str(cfg.teacher_epochs),
        "--lr", f"{cfg.lr:g}", "--batch-size", str(cfg.batch_size), "--seed", "0", "--threads", "1",
        "--quiet", "--out", str(weights), log=commands)
    cli("dump", "--teacher", f"builtin:{arch}", "--weights", str(weights), "--dataset", spec,
        "--split", "train", "--k", str(cfg.classes), "--temperatures", "1,2,4", "--no-features",
        "--workers", "1", "--overwrite", "--quiet", "--out", str(store), log=commands)


def _check_resumable(out: Path, cfg: argparse.Namespace) -> None:
    """Runs already in ``out`` are reused only if they were made with the same settings."""
    keys = ("taus", "difficulty", "classes", "superclasses", "dim", "train_samples", "test_samples", "data_seed",
            "teacher_width", "teacher_epochs", "student_width", "epochs", "lr", "batch_size", "temperature")
    current = {k: getattr(cfg, k) for k in keys}
    path = out / "config.json"
    if path.exists() and json.loads(path.read_text()) != current:
        raise SystemExit(f"{out} holds runs made with other settings ({path}); use another --out or delete it")
    path.write_text(json.dumps(current, indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, cfg)
    start = time.perf_counter()
    commands: list[str] = []
    teacher_arch = f"tangmlp-{cfg.teacher_width}"
    grid = [(m, t) for m in cfg.difficulty for t in cfg.taus]
    settings = []
    # 1-2: teachers and stores (each step a CLI process; a dump starts its own Ray instance).
    for difficulty, tau in grid:
        spec = dataset_spec(cfg, tau, difficulty)
        tag = f"M{difficulty}-tau{tau:g}"
        weights, store = out / f"teacher-{tag}.pt", out / f"store-{tag}.zarr"
        if not (weights.exists() and _complete(store)):
            _fit_and_dump(cfg, spec, teacher_arch, weights, store, commands)
        summary = teacher_summary(spec, weights, store, cfg.teacher_width)
        print(f"teacher {tag}: test {100 * summary['test_accuracy']:.2f}%, train {100 * summary['train_accuracy']:.2f}%, "
              f"mean p_t[y] T=1 {summary['mean_p_true_T1']:.3f}", flush=True)
        settings.append({"difficulty": difficulty, "tau": tau, "dataset": spec, "store": str(store),
                         "teacher": summary, "runs": {}, "sweeps": {}})
    # 3: students, all settings and seeds in one pool.
    rows = method_rows(cfg.classes, cfg.temperature)
    sweeps = [] if cfg.no_sweeps else sweep_rows()
    # Seed-major, main table first: an interrupted run leaves whole seeds of every cell, and a
    # rerun with the same --out reuses every finished run (its metrics.json).
    plan = [(seed, s, "runs", row) for seed in range(cfg.seeds) for s in settings for row in rows]
    swept = [s for s in settings if s["difficulty"] == cfg.sweep_difficulty]
    ends = {"low": swept[:1], "ends": [*swept[:1], *swept[1:][-1:]]}
    plan += [(seed, s, "sweeps", row[:3]) for seed in range(cfg.sweep_seeds) for row in sweeps for s in ends[row[3]]]
    jobs, reused = [], 0
    for seed, s, kind, (label, method, opts) in plan:
        run_dir = out / "runs" / f"M{s['difficulty']}-tau{s['tau']:g}" / kind / label.replace(" ", "_") / f"seed{seed}"
        job = {"dataset": s["dataset"], "store": s["store"], "method": method, "opts": opts, "seed": seed,
               "run_dir": str(run_dir)}
        argv = train_argv(job, cfg)
        commands.append("softlabels " + " ".join(shlex.quote(a) for a in argv))
        jobs.append((s, kind, label, argv))
        reused += _finished(argv)
    print(f"{len(jobs)} student runs ({reused} already done in {out}) on {cfg.workers} single-threaded workers ...",
          flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = multiprocessing.get_context("spawn")
    done = [job for job in jobs if _finished(job[3])]
    todo = [job for job in jobs if not _finished(job[3])]
    for s, kind, label, argv in done:
        s[kind].setdefault(label, []).append(run_train(argv, reuse=True))
    if todo:
        with concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = [pool.submit(run_train, argv) for *_, argv in todo]
            for (s, kind, label, _), future in zip(todo, futures):
                s[kind].setdefault(label, []).append(future.result())
    for s in settings:  # seed order within each cell, whatever order the runs finished in
        for kind in ("runs", "sweeps"):
            s[kind] = {label: sorted(runs, key=lambda r: r["seed"]) for label, runs in s[kind].items()}
    wall = time.perf_counter() - start
    results = {
        "setup": (
            f"synthetic d={cfg.dim}, C={cfg.classes}, S={cfg.superclasses}, {cfg.train_samples:,} train / "
            f"{cfg.test_samples:,} test samples, data seed {cfg.data_seed}; teacher tangmlp-{cfg.teacher_width} "
            f"({cfg.teacher_epochs} epochs), student tangmlp-{cfg.student_width} ({cfg.epochs} epochs); Adam lr "
            f"{cfg.lr:g} cosine to 0, batch {cfg.batch_size}; KD family at T={cfg.temperature:g}, CE 0.1 / KD 0.9; "
            f"{cfg.seeds} seed(s); {len(jobs)} student runs ({reused} read back from an earlier run) on "
            f"{cfg.workers} workers; wall {wall / 60:.1f} min"
        ),
        "config": {k: v for k, v in vars(cfg).items()},
        "labels": [label for label, *_ in rows],
        "settings": settings,
        "wall_seconds": wall,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "commands.txt").write_text("\n".join(commands) + "\n")
    text = report(results, cfg)
    (out / "results.md").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
