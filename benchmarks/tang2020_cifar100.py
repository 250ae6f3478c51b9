"""Tang et al. 2020 on CIFAR-100 (resnet56 -> resnet20) through dump + train: the plan for a GPU
machine. It cannot run on the 2-core dev machine (no GPU, no CIFAR download); no numbers from it
are claimed anywhere. ``--smoke`` proves the path on a fake CIFAR-shaped image folder on CPU.

Steps (each printed as the ``softlabels`` command a user would type):

1. teacher: ``--teacher-weights`` -- a resnet56 state_dict trained elsewhere with the usual CIFAR
   recipe (random crop + flip, SGD), keys as in ``softlabels.models_cifar``: the intended route,
   because ``softlabels teacher fit`` trains without augmentation and on the CPU only.
   Without it the script falls back to ``softlabels teacher fit --arch resnet56``.
2. ``softlabels dump`` of the test split (k = 1: the teacher's test accuracy, from the store's
   summary) and of the train split: all 100 logits in float32 (KD exact; 20 MB; a barely
   trained smoke teacher's logits can overflow float16), normalisers at T = 1, 2, 4,
   the classifier weight for KD-sim; one view per image (no stored augmentation for torchvision
   datasets yet), so the students train in the "fixed teacher" regime (BRIEF section 3).
3. ``softlabels train --student builtin:resnet20`` per method and seed: CE, LS, KD, KD-pt,
   KD-sim, KD-pt+sim, KD-topk k = 1, 3, 25, at T = 4 with CE 0.1 / KD 0.9, on the trainer's
   CIFAR training view (pad-4 random crop + horizontal flip, the default for ``cifar100:``). Recipe: RepDistiller's CIFAR-100 one (240 epochs, batch 64, SGD
   momentum 0.9, lr 0.05, weight decay 5e-4; cosine instead of its step decay at 150/180/210),
   passed as ``--optimizer sgd --momentum --weight-decay --schedule cosine``. Paper's numbers (Tang et al., CIFAR-100 table; BRIEF section 2): teacher 75.68, student 72.51, LS 73.87,
   KD 75.94, KD-pt 75.08, KD-sim 74.30, KD-pt+sim 75.24, KD-topk 76.17.

``python benchmarks/tang2020_cifar100.py --root /data/cifar100 --teacher-weights resnet56.pt``
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tang2020 import cli, run_train  # noqa: E402  (shared step runners)

PAPER = {"teacher": 75.68, "ce": 72.51, "ls": 73.87, "kd": 75.94, "kd-pt": 75.08, "kd-sim": 74.30,
         "kd-pt+sim": 75.24, "kd-topk k=25": 76.17}
SGD_RECIPE = ["--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "5e-4", "--schedule", "cosine"]


def methods(num_classes: int, temperature: float) -> list[tuple[str, str, list[str]]]:
    t = ["--temperature", f"{temperature:g}"]
    quarter = max(1, num_classes // 4)
    return [("ce", "ce", []), ("ls", "ls", []), ("kd", "kd", t), ("kd-pt", "kd-pt", t), ("kd-sim", "kd-sim", t),
            ("kd-pt+sim", "kd-pt+sim", t), ("kd-topk k=1", "kd-topk", [*t, "--k", "1"]),
            ("kd-topk k=3", "kd-topk", [*t, "--k", "3"]), (f"kd-topk k={quarter}", "kd-topk", [*t, "--k", str(quarter)])]


def make_fake_cifar(root: Path, num_classes: int, train_per_class: int, test_per_class: int, seed: int = 0) -> str:
    """A CIFAR-shaped image folder (RGB 32x32 PNGs, ``train``/``test`` sub-folders, one folder per
    class) whose class is a colour cue plus noise; returns its dataset spec (CIFAR-100 stats)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(num_classes, 3))
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        for c in range(num_classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                noise = rng.normal(0, 40, size=(32, 32, 3))
                pixels = np.clip(base[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return f"imagefolder:{root}?size=32&crop=32&mean=0.5071,0.4865,0.4409&std=0.2673,0.2564,0.2762"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="Local CIFAR-100 root (the directory holding cifar-100-python/).")
    p.add_argument("--dataset", help="Any dataset spec instead of cifar100:ROOT.")
    p.add_argument("--out", default="tang-cifar100-out")
    p.add_argument("--teacher-weights", help="A trained resnet56 state_dict (recommended; see step 1).")
    p.add_argument("--teacher-epochs", type=int, default=240, help="Only without --teacher-weights.")
    p.add_argument("--epochs", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate.")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke: a fake CIFAR-shaped folder (20 classes, 3+1 images each), 1 epoch, 1 seed.")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.teacher_epochs, args.seeds, args.batch_size = 1, 1, 1, 16
    elif not (args.root or args.dataset):
        p.error("give --root (a local CIFAR-100 copy) or --dataset, or --smoke")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cfg.smoke:
        spec, num_classes = make_fake_cifar(out / "fake-cifar", 20, 3, 1), 20
    else:
        spec, num_classes = cfg.dataset or f"cifar100:{Path(cfg.root).absolute()}", 100
    log: list[str] = []
    weights = Path(cfg.teacher_weights).absolute() if cfg.teacher_weights else out / "teacher-resnet56.pt"
    if not cfg.teacher_weights:
        cli("teacher", "fit", "--dataset", spec, "--arch", "resnet56", "--epochs", str(cfg.teacher_epochs),
            "--batch-size", str(cfg.batch_size), "--seed", "0", "--quiet", "--out", str(weights), log=log)
    store = out / "store-train.zarr"
    cli("dump", "--teacher", "builtin:resnet56", "--weights", str(weights), "--dataset", spec, "--split", "train",
        "--k", str(num_classes), "--temperatures", "1,2,4", "--value-dtype", "float32", "--no-features", "--overwrite", "--quiet",
        "--out", str(store), log=log)
    test_store = out / "store-test.zarr"  # the teacher's test accuracy, from the dump's own summary
    cli("dump", "--teacher", "builtin:resnet56", "--weights", str(weights), "--dataset", spec, "--split", "test",
        "--k", "1", "--temperatures", "1", "--value-dtype", "float32", "--no-features", "--overwrite", "--quiet",
        "--out", str(test_store), log=log)
    from softlabels.stores import open_store

    teacher_accuracy = open_store(str(test_store)).meta.summary["teacher_top1_accuracy"]
    print(f"teacher resnet56: test accuracy {100 * teacher_accuracy:.2f}%", flush=True)
    recipe = [*SGD_RECIPE, "--lr", f"{cfg.lr:g}"]
    results: dict[str, list[dict[str, Any]]] = {}
    for label, method, flags in methods(num_classes, cfg.temperature):
        for seed in range(cfg.seeds):
            run_dir = out / "runs" / label.replace(" ", "_") / f"seed{seed}"
            argv = ["train", "--dataset", spec, "--student", "builtin:resnet20", "--method", method, *flags,
                    "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), *recipe,
                    "--seed", str(seed), "--quiet", "--out", str(run_dir)]
            if method not in ("ce", "ls"):
                argv[1:1] = ["--store", str(store)]
            log.append("softlabels " + " ".join(shlex.quote(a) for a in argv))
            print("$ " + log[-1], flush=True)
            results.setdefault(label, []).append(run_train(argv))
    lines = ["| method | best | last | paper |", "|---|---|---|---|",
             f"| teacher resnet56 | – | {100 * teacher_accuracy:.2f} | {PAPER['teacher']:.2f} |"]
    for label, runs in results.items():
        cells = []
        for key in ("best_test_accuracy", "test_accuracy"):
            values = [100 * r[key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {std:.2f}")
        paper = PAPER.get(label)
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {'–' if paper is None else f'{paper:.2f}'} |")
    summary = {"dataset": spec, "recipe": recipe, "teacher_test_accuracy": teacher_accuracy, "runs": results, "wall_seconds": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    main()
