"""Student training throughput on real photos: CE vs store-fed KD vs online KD, interleaved.

    nice -n 5 python benchmarks/train_images.py [--images 320] [--size 64] [--rounds 5] [--epochs 3]

A ResNet-18 student (torchvision, random init) trains on real-photo crops (scikit-learn's
sample photos, ``benchmarks/photo_folder.py``; ``imagefolder:...?size=S+8&crop=S``) with the
trainer's image recipe: random-resized crop + flip decoded in 2 DataLoader workers, SGD, batch 32,
one torch thread in the main process. Three arms, run one after the other in each round, in an
order rotated every round (interleaved, so drift in the machine's load hits all three alike):

* ``ce``        -- ``train_student(..., "ce")`` (no store: the floor);
* ``store-kd``  -- ``train_student(..., "kd")`` from a store dumped once from a torchvision
  ResNet-50 teacher (the targets are joined in the loader workers);
* ``online-kd`` -- the same data path and student in a plain loop written here, with the ResNet-50
  teacher in memory: every batch runs the teacher forward (inference mode) and feeds
  ``softmax(z_t / T)`` to ``kd_loss``.

Images/s is training images over the epoch loop's seconds (evaluation excluded), median over a
run's epochs after the first (the first pays one-off costs alike in every arm: oneDNN primitive
creation, first allocations; it is kept only when ``--epochs 1``); the table reports the median
over rounds and the store-kd/ce ratio per round. Target: store-fed KD >= 0.97 x CE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from photo_folder import make_photo_folder  # noqa: E402

BATCH, WORKERS, LR, TEACHER = 32, 2, 0.05, "torchvision:resnet50"


def dump_store(spec: str, out: Path, size: int) -> None:
    from softlabels.pipelines.dump import run_dump
    from softlabels.pipelines.predictor import DumpConfig

    config = DumpConfig(teacher=TEACHER, dataset=spec, out=str(out), k=4, temperatures=(4.0,), batch_size=64,
                        loader_workers=1, threads_per_worker=1)
    run_dump(config, workers=1)


def trainer_rates(store: str | None, spec: str, method: str, epochs: int, out: Path) -> list[float]:
    from softlabels.recipe import Recipe
    from softlabels.train import train_student

    metrics = train_student(store, spec, "torchvision:resnet18", method, epochs=epochs, batch_size=BATCH,
                            recipe=Recipe(optimizer="sgd", lr=LR), out_dir=out, eval_split=None, progress=False,
                            num_workers=WORKERS, temperature=4.0 if method == "kd" else None)
    return _steady([h["images_per_second"] for h in metrics["history"]])


def _steady(rates: list[float]) -> list[float]:
    """Per-epoch rates without the first epoch (warm-up), unless it is the only one."""
    return rates[1:] if len(rates) > 1 else rates


def online_rates(spec: str, epochs: int, teacher: torch.nn.Module) -> list[float]:
    from softlabels.datasets import load_dataset
    from softlabels.data import DistillDataset, StoreBatchSampler, make_loader
    from softlabels.losses import kd_loss
    from softlabels.recipe import Recipe, build_optimizer
    from softlabels.student import build_student
    from softlabels.train_transforms import train_transform_for

    dataset, info = load_dataset(spec, "train")
    data = DistillDataset(dataset, None, info=info, train_transform=train_transform_for(dataset, info.input_shape, True))
    sampler = StoreBatchSampler(data, BATCH, shuffle=True, seed=0)
    loader = make_loader(data, sampler, num_workers=WORKERS)
    torch.manual_seed(0)
    student = build_student("torchvision:resnet18", info.input_shape, info.num_classes)
    optimizer = build_optimizer(Recipe(optimizer="sgd", lr=LR), [student])
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for batch in loader:
            x, y = batch["input"], batch["label"]
            with torch.inference_mode():
                probs = torch.softmax(teacher(x).float() / 4.0, dim=-1)
            loss = kd_loss(student(x), probs.clone(), y, temperature=4.0).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += x.shape[0]
        rates.append(seen / (time.perf_counter() - start))
    return _steady(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from softlabels.specs import build_from_spec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photo_folder(root / "photos", train=args.images, val=0, size=args.size + 8)
        spec = f"imagefolder:{root / 'photos'}?size={args.size + 8}&crop={args.size}"
        t0 = time.perf_counter()
        dump_store(spec, root / "teacher.zarr", args.size)
        print(f"dumped {TEACHER} over {args.images} images in {time.perf_counter() - t0:.1f} s", flush=True)
        teacher = build_from_spec(TEACHER, (3, args.size, args.size), 4).eval()
        rates: dict[str, list[float]] = {"ce": [], "store-kd": [], "online-kd": []}
        ratios = []
        arms = {
            "ce": lambda: trainer_rates(None, spec, "ce", args.epochs, root / "ce"),
            "store-kd": lambda: trainer_rates(str(root / "teacher.zarr"), spec, "kd", args.epochs, root / "kd"),
            "online-kd": lambda: online_rates(spec, args.epochs, teacher),
        }
        names = list(arms)
        for r in range(args.rounds):
            order = names[r % 3 :] + names[: r % 3]  # rotate, so drift in the machine's load hits every arm alike
            this = {name: statistics.median(arms[name]()) for name in order}
            for name in names:
                rates[name].append(this[name])
            ratios.append(this["store-kd"] / this["ce"])
            print(f"round {r + 1} ({' -> '.join(order)}): ce {this['ce']:.1f}  store-kd {this['store-kd']:.1f}  "
                  f"online-kd {this['online-kd']:.1f} img/s  (store-kd/ce {ratios[-1]:.3f})", flush=True)
    ce_med = statistics.median(rates["ce"])
    print(f"\n| arm | images/s (median of {args.rounds} rounds, {args.epochs} epoch(s) each) | vs ce |")
    print("|---|---|---|")
    for arm, values in rates.items():
        med = statistics.median(values)
        print(f"| {arm} | {med:.1f} (range {min(values):.1f}-{max(values):.1f}) | {med / ce_med:.3f} |")
    verdict = "meets" if statistics.median(ratios) >= 0.97 else "misses"
    print(f"\nstore-kd / ce per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f} "
          f"({verdict} the >= 0.97 target)")


if __name__ == "__main__":
    main()
