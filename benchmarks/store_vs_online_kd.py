"""Does KD from a full-k store train the same student as online KD with the teacher in memory?

    python benchmarks/store_vs_online_kd.py [--seeds 5] [--epochs 60] [--out bench-out/kd-equivalence]

MNIST-1D (4,000 labelled train samples), the builtin ``cnn`` teacher fitted with
``softlabels teacher fit`` and dumped with ``softlabels dump --k 10`` (k = C: the store holds the
full teacher softmax at every stored T, as normalised float16 logits + float32 normalisers).
For each seed, the 40-100-100-10 MLP student is trained twice with the same hyperparameters
(KD, T = 4, CE weight 0.1, KD weight 0.9, Adam 1e-2 with cosine decay, batch 128, 60 epochs):

* ``store``  -- ``softlabels.train.train_student`` (the ``softlabels train`` path: the teacher is
  never built; targets come from the store);
* ``online`` -- a plain loop written here with the teacher in memory: every batch runs the teacher
  forward in fp32 and feeds ``softmax(z_t / T)`` to the same ``kd_loss``.

The two arms share nothing but the hyperparameters, the seed and the data (different code paths,
different batch order), so the difference between their means is compared with the seed-to-seed
spread: "matches" means |mean difference| is within one pooled standard deviation. Runs go to two
single-threaded processes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEMPERATURE, CE_WEIGHT, KD_WEIGHT, LR, BATCH = 4.0, 0.1, 0.9, 1e-2, 128


def _cli(*args: str) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([sys.executable, "-m", "softlabels.cli.app", *args], check=True, env=env)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_store(store: str, seed: int, epochs: int, out: str) -> float:
    from softlabels.train import train_student

    metrics = train_student(
        store, "mnist1d", "builtin:mlp", "kd", temperature=TEMPERATURE, epochs=epochs, seed=seed,
        batch_size=BATCH, lr=LR, out_dir=out, progress=False,
        hparams={"ce_weight": CE_WEIGHT, "kd_weight": KD_WEIGHT},
    )
    return float(metrics["test_accuracy"])


def run_online(teacher_path: str, seed: int, epochs: int) -> float:
    import torch

    from softlabels.datasets import load_dataset
    from softlabels.fit import evaluate_accuracy
    from softlabels.losses import kd_loss
    from softlabels.teachers import load_teacher
    from softlabels.train import build_student

    train, info = load_dataset("mnist1d", "train")
    test, _ = load_dataset("mnist1d", "test")
    x_all, y_all = train.inputs, train.targets.long()
    teacher = load_teacher("builtin:cnn", teacher_path, input_shape=tuple(info.input_shape), num_classes=info.num_classes)
    torch.manual_seed(seed)
    student = build_student("builtin:mlp", tuple(info.input_shape), info.num_classes)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    steps_per_epoch = -(-len(train) // BATCH)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=generator).split(BATCH):
            x, y = x_all[idx], y_all[idx]
            with torch.inference_mode():
                probs = torch.softmax(teacher.model(x).float() / TEMPERATURE, dim=1)
            out = kd_loss(student(x), probs.clone(), y, temperature=TEMPERATURE, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            optimizer.step()
            scheduler.step()
    return float(evaluate_accuracy(student, test))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--out", default="bench-out/kd-equivalence")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, store = out / "teacher.pt", out / "mnist1d-train-k10.zarr"
    if not teacher.exists():
        _cli("teacher", "fit", "--dataset", "mnist1d", "--arch", "cnn", "--epochs", str(args.teacher_epochs),
             "--seed", "0", "--out", str(teacher), "--quiet")
    _cli("dump", "--teacher", "builtin:cnn", "--weights", str(teacher), "--dataset", "mnist1d", "--split", "train",
         "--k", "10", "--temperatures", "1,2,4,8", "--workers", "1", "--overwrite", "--quiet", "--out", str(store))

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=_one_thread) as pool:
        jobs = {}
        for seed in range(args.seeds):
            jobs[pool.submit(run_store, str(store), seed, args.epochs, str(out / f"store-seed{seed}"))] = ("store", seed)
            jobs[pool.submit(run_online, str(teacher), seed, args.epochs)] = ("online", seed)
        acc: dict[str, dict[int, float]] = {"store": {}, "online": {}}
        for fut in concurrent.futures.as_completed(jobs):
            arm, seed = jobs[fut]
            acc[arm][seed] = 100 * fut.result()

    seeds = range(args.seeds)
    store_acc = [acc["store"][s] for s in seeds]
    online_acc = [acc["online"][s] for s in seeds]
    m_s, sd_s = statistics.mean(store_acc), statistics.stdev(store_acc)
    m_o, sd_o = statistics.mean(online_acc), statistics.stdev(online_acc)
    pooled = ((sd_s**2 + sd_o**2) / 2) ** 0.5
    diff = m_s - m_o
    print(f"\nKD T={TEMPERATURE:g} (CE {CE_WEIGHT} / KD {KD_WEIGHT}), mlp student, mnist1d 4,000 train, "
          f"{args.epochs} epochs, {args.seeds} seeds")
    print(f"{'arm':<8} {'test accuracy %':>18}   per seed")
    print(f"{'store':<8} {m_s:>10.2f} ± {sd_s:.2f}   " + " ".join(f"{a:.1f}" for a in store_acc))
    print(f"{'online':<8} {m_o:>10.2f} ± {sd_o:.2f}   " + " ".join(f"{a:.1f}" for a in online_acc))
    verdict = "matches" if abs(diff) <= pooled else "differs"
    print(f"store - online = {diff:+.2f} points; pooled seed std {pooled:.2f} -> {verdict} within seed noise")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
