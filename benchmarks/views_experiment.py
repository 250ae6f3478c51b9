"""Augmentation-consistent targets on mnist1d: does replaying stored teacher views help?

Same student, same budget (epochs, batch size, optimizer steps, seeds) in every row:

* **KD, no augmentation** -- reference: one target per sample, un-augmented inputs;
* **(a) fixed teacher** -- one target per sample (dumped without augmentation), the student sees
  a fresh random shift every epoch (``--student-augment shift1d``): targets and inputs disagree;
* **(b) replayed views** -- the teacher was dumped once over V shifted views per sample
  (``dump --views V --augment shift1d``); every epoch the student trains on the next stored view
  with *that view's* targets (``train --views next``);
* **(c) online KD, consistent** -- the teacher stays in memory and labels the very view the
  student sees, with the same fresh shifts as (a) (``(seed, epoch, sample)``-keyed): the ideal
  that (b) approximates with a finite V. This path lives here, not in the library: the train
  path never imports a teacher.
* CE with the same random shift, no teacher, for scale.

Commands are printed as a user would type them; student runs go to a pool of two
single-threaded processes. ``python benchmarks/views_experiment.py --out views-out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DATASET = "mnist1d"
STUDENT = "builtin:mlp"


def sh(*args: str) -> None:
    print("$ softlabels " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-m", "softlabels.cli.app", *args], env=env)
    if r.returncode:
        raise SystemExit(f"step failed (exit {r.returncode})")


def train_from_store(job: dict[str, Any]) -> dict[str, Any]:
    """Regimes (a), (b) and the references: the library's own ``softlabels train`` path."""
    from softlabels.train import train_student

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        m = train_student(job["store"], DATASET, STUDENT, job["method"], epochs=job["epochs"], seed=job["seed"],
                          out_dir=run_dir, progress=False, temperature=job.get("temperature"),
                          views=job.get("views", "first"), student_augment=job.get("student_augment"))
    return {"test_accuracy": m["test_accuracy"], "wall_seconds": m["wall_seconds"], "steps": m["steps"]}


def train_online(job: dict[str, Any]) -> dict[str, Any]:
    """Regime (c): the trainer's recipe (same init, sampler, Adam + cosine, KD T=4 method),
    with teacher targets computed on the fly on the student's augmented view."""
    from softlabels.augment import get_student_augment
    from softlabels.datasets import load_dataset
    from softlabels.data import StoreBatchSampler
    from softlabels.fit import evaluate_accuracy
    from softlabels.losses import build_method
    from softlabels.stores import format as fmt
    from softlabels.targets import summarize_logits
    from softlabels.teachers import load_teacher
    from softlabels.train import build_student

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seed, epochs, batch_size, temperature = job["seed"], job["epochs"], 128, 4.0
    data, info = load_dataset(DATASET, "train")
    test, _ = load_dataset(DATASET, "test")
    teacher = load_teacher("builtin:cnn", job["weights"], input_shape=info.input_shape, num_classes=10).model.eval()
    shift = get_student_augment(job["student_augment"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_student(STUDENT, tuple(info.input_shape), 10)
        loss_fn = build_method("kd", temperature=temperature, num_classes=10)
    sampler = StoreBatchSampler(info.num_samples, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.Adam([*student.parameters(), *loss_fn.parameters()], lr=1e-2)
    steps = epochs * len(sampler)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.train()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for batch in sampler:
                index = torch.as_tensor(batch)
                x = shift(data.inputs[index], index.numpy(), seed, epoch)
                y = data.targets[index]
                with torch.no_grad():
                    fields = summarize_logits(teacher(x), 10, (temperature,), y)
                targets = {name: fields[name] for name in loss_fn.needs}
                if fmt.LOGSUMEXP in targets:
                    targets[fmt.LOGSUMEXP] = targets[fmt.LOGSUMEXP][:, 0]
                out = loss_fn(student(x), y, targets, stage=loss_fn.stage(epoch, epochs))
                optimizer.zero_grad(set_to_none=True)
                out.total.backward()
                optimizer.step()
                scheduler.step()
    student.eval()
    return {"test_accuracy": evaluate_accuracy(student, test), "wall_seconds": time.perf_counter() - t0, "steps": steps}


def fit_shift_teacher(path: Path, policy: str, epochs: int = 40, seed: int = 0) -> None:
    """``softlabels teacher fit``'s recipe (CNN, Adam + cosine, batch 128, CE), but every epoch
    each training sample is freshly shifted: a teacher that has learnt the augmentation.
    (``teacher fit`` has no augmentation option; this variant lives in the experiment only.)"""
    from softlabels.augment import get_student_augment
    from softlabels.datasets import load_dataset
    from softlabels.fit import DEFAULT_LR, evaluate_accuracy
    from softlabels.models import build_model

    data, info = load_dataset(DATASET, "train")
    test, _ = load_dataset(DATASET, "test")
    shift = get_student_augment(policy)
    n, batch_size = info.num_samples, 128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("cnn", tuple(info.input_shape), 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=DEFAULT_LR)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-n // batch_size))
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                x = shift(data.inputs[index], index.numpy(), seed + 1000, epoch)
                loss = torch.nn.functional.cross_entropy(model(x), data.targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    model.eval()
    torch.save(model.state_dict(), path)
    print(f"teacher (CNN, {epochs} epochs, trained with a fresh {policy} per epoch): "
          f"test accuracy {evaluate_accuracy(model, test):.4f}; wrote {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="views-out")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--shift", type=int, default=6, help="shift1d max (samples of a length-40 signal)")
    p.add_argument("--teacher-augment", action="store_true",
                   help="train the teacher with the same random shift (default: `softlabels teacher fit`, no augmentation)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    policy = f"shift1d:max={args.shift}"
    teacher = out / ("teacher-shift.pt" if args.teacher_augment else "teacher.pt")
    if not teacher.exists() and args.teacher_augment:
        fit_shift_teacher(teacher, policy)
    elif not teacher.exists():
        sh("teacher", "fit", "--dataset", DATASET, "--arch", "cnn", "--epochs", "40", "--seed", "0", "--out", str(teacher))
    single, multi = out / "single.zarr", out / f"views{args.views}.zarr"
    common = ["dump", "--teacher", "builtin:cnn", "--weights", str(teacher), "--dataset", DATASET, "--split", "train",
              "--k", "10", "--temperatures", "4", "--no-features", "--workers", "2", "--overwrite", "--quiet"]
    sh(*common, "--out", str(single))
    sh(*common, "--views", str(args.views), "--augment", policy, "--out", str(multi))

    from softlabels.stores import open_store

    stores = {name: open_store(path) for name, path in (("single", single), ("multi", multi))}
    base = {"method": "kd", "temperature": 4.0, "epochs": args.epochs}
    rows: list[tuple[str, str, Any, dict[str, Any]]] = [
        ("KD, no augmentation (reference)", "store", train_from_store, {**base, "store": str(single)}),
        (f"(a) single-view targets + student {policy}", "store", train_from_store,
         {**base, "store": str(single), "student_augment": policy}),
        (f"(b) V={args.views} replayed views, --views next", "store", train_from_store,
         {**base, "store": str(multi), "views": "next"}),
        (f"(c) online KD, consistent {policy}", "online", train_online,
         {"epochs": args.epochs, "weights": str(teacher), "student_augment": policy}),
        (f"CE + student {policy} (no teacher)", "none", train_from_store,
         {"method": "ce", "epochs": args.epochs, "store": None, "student_augment": policy}),
    ]
    results = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [[pool.submit(fn, {**job, "seed": s}) for s in range(args.seeds)] for _, _, fn, job in rows]
        for (label, kind, _, job), runs in zip(rows, futures):
            got = [f.result() for f in runs]
            accs = [g["test_accuracy"] for g in got]
            store = {"store": None, "online": None, "none": None}.get(kind)
            if job.get("store"):
                s = stores["multi" if job["store"] == str(multi) else "single"]
                store = {"views": s.views, "bytes_per_sample": s.bytes_on_disk() / s.num_samples,
                         "teacher_top1_on_stored_views": s.meta.summary.get("teacher_top1_accuracy")}
            results.append({"run": label, "accuracies": accs, "mean": statistics.mean(accs),
                            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "steps": got[0]["steps"],
                            "seconds_per_run": statistics.mean(g["wall_seconds"] for g in got), "store": store})
            print(f"{label}: {100 * results[-1]['mean']:.1f} ± {100 * results[-1]['std']:.1f} %  "
                  f"({', '.join(f'{100 * a:.1f}' for a in accs)}; {results[-1]['seconds_per_run']:.0f} s/run)", flush=True)
    summary = {"teacher_augment": args.teacher_augment, "seeds": args.seeds, "epochs": args.epochs, "views": args.views, "policy": policy, "results": results,
               "wall_seconds": time.perf_counter() - t0}
    (out / "views_results.json").write_text(json.dumps(summary, indent=2))
    print("| regime | test acc % (mean ± std) | steps | s/run | store B/sample | teacher top-1 on its stored views |")
    print("|---|---|---|---|---|---|")
    for r in results:
        st = r["store"] or {}
        size = f"{st['bytes_per_sample']:.0f}" if st else "–"
        top1 = f"{100 * st['teacher_top1_on_stored_views']:.1f}" if st.get("teacher_top1_on_stored_views") else "–"
        print(f"| {r['run']} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {r['steps']} | "
              f"{r['seconds_per_run']:.0f} | {size} | {top1} |")
    print(f"total {summary['wall_seconds']:.0f} s wall")


if __name__ == "__main__":
    main()
