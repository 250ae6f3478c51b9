"""Dump overhead: Ray dump throughput (features on) vs a plain teacher forward over the same
DataLoader, and 1 vs 2 workers, all in one run.

    python benchmarks/dump_overhead.py                 # 4,096 images, resnet18 at 32x32, 5 rounds
    python benchmarks/dump_overhead.py --images 8192 --loader-workers 1 0 --rows-per-unit 256 1024

Data: an ImageFolder of real 32x32 crops cut from scikit-learn's bundled sample photos (10
class folders), decoded by torchvision exactly as `softlabels dump --dataset imagefolder:...`
does. Teacher: torchvision resnet18 (random init, 10 classes) -- compute-bound on a CPU.
Each dump worker and the plain forward are limited to one torch thread, so the comparison is
per-core and the 2-worker run shows scaling. ``--loader-workers`` (decoding processes per dump
worker; the plain forward's DataLoader gets the same ``num_workers``) may list several settings:
each is measured in every round. ``--rows-per-unit`` (the store's shard = the unit of work, of
resume and of one write) may list several sizes: the 1-worker dump runs at each, the 2-worker
dump at the first. 256 rows (the default) is what the store's default layout gives 4,096 rows
(~16 units); stores of >= 16,384 rows get >= 1,024-row units and large ones 65,536-row units, so
a larger size shows whether the dump's fixed cost per unit (a Ray call, one write per array, the
driver's completion record, a decode restart) matters. Rounds interleave all runs (the machine
is shared and noisy); the ratios are medians of per-round ratios, with their range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_imagefolder(root: Path, images: int, size: int = 32, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - size)
        x = rng.integers(0, photo.shape[1] - size)
        crop = photo[y : y + size, x : x + size]
        Image.fromarray(crop).save(root / f"class{i % classes}" / f"{i:06d}.png")


def plain_forward(spec: str, weights: str, arch: str, batch_size: int, loader_workers: int = 0) -> float:
    """Rows/s of the teacher alone: same dataset, same DataLoader settings, one thread."""
    from softlabels.datasets import load_dataset
    from softlabels.teachers import load_teacher

    torch.set_num_threads(1)
    dataset, info = load_dataset(spec, "train")
    teacher = load_teacher(f"torchvision:{arch}", weights, input_shape=info.input_shape, num_classes=info.num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    model = teacher.model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
    return info.num_samples / (time.perf_counter() - t0)


def dump(spec: str, weights: str, arch: str, out: str, workers: int, batch_size: int, loader_workers: int = 0,
         rows_per_unit: int = 256) -> dict:
    from softlabels.pipelines.dump import run_dump
    from softlabels.pipelines.predictor import DumpConfig

    config = DumpConfig(teacher=f"torchvision:{arch}", weights=weights, dataset=spec, out=out, k=10,
                        batch_size=batch_size, threads_per_worker=1, rows_per_shard=rows_per_unit,
                        rows_per_chunk=min(rows_per_unit, 1024), loader_workers=loader_workers)
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    result = run_dump(config, workers=workers, on_unit=lambda unit, rows: marks.append((time.perf_counter(), rows)))
    wall = time.perf_counter() - t0
    # steady state: from the first finished unit(s) of every worker to the last unit
    first = marks[workers - 1][0] if len(marks) >= workers else marks[0][0]
    rows_after = sum(rows for _, rows in marks[workers:])
    steady = rows_after / (marks[-1][0] - first) if marks[-1][0] > first else float("nan")
    return {"wall_s": wall, "end_to_end_rows_per_s": result.rows / wall, "steady_rows_per_s": steady,
            "bytes_per_sample": result.bytes_per_sample}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 0],
                   help="decoding processes per dump worker (and the plain forward's num_workers); 1 is the dump default")
    p.add_argument("--rows-per-unit", type=int, nargs="+", default=[256],
                   help="rows per unit (= per shard) of the 1-worker dump; the 2-worker dump uses the first")
    args = p.parse_args()
    sizes = args.rows_per_unit
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    from softlabels.models import build_model  # noqa: F401 - warm imports before timing
    from softlabels.teachers import load_teacher

    runs: dict[int, dict] = {w: {"plain": [], "one": {u: [] for u in sizes}, "two": []} for w in args.loader_workers}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        make_imagefolder(root, args.images)
        spec = f"imagefolder:{root}?size=32&crop=32"
        weights = str(Path(tmp) / "teacher.pt")
        teacher = load_teacher(f"torchvision:{args.arch}", None, input_shape=(3, 32, 32), num_classes=10)
        torch.save(teacher.model.state_dict(), weights)
        for r in range(args.rounds):  # interleaved rounds: the machine is shared and noisy
            for w in args.loader_workers:
                out = Path(tmp) / f"r{r}w{w}"
                runs[w]["plain"].append(plain_forward(spec, weights, args.arch, args.batch_size, w))
                for u in sizes if r % 2 == 0 else sizes[::-1]:
                    runs[w]["one"][u].append(dump(spec, weights, args.arch, str(out / f"one{u}.zarr"), 1, args.batch_size,
                                                  w, u))
                runs[w]["two"].append(dump(spec, weights, args.arch, str(out / "two.zarr"), 2, args.batch_size, w,
                                           sizes[0]))
                ones = ", ".join(f"{runs[w]['one'][u][-1]['steady_rows_per_s']:,.0f} ({u}-row units)" for u in sizes)
                print(f"round {r + 1} loader workers {w}: plain {runs[w]['plain'][-1]:,.0f} rows/s, dump 1 worker {ones}, "
                      f"2 workers {runs[w]['two'][-1]['steady_rows_per_s']:,.0f}", flush=True)
    med = statistics.median
    print(f"$ python benchmarks/dump_overhead.py --images {args.images} --arch {args.arch} --batch-size {args.batch_size} "
          f"--rounds {args.rounds} --loader-workers {' '.join(map(str, args.loader_workers))} "
          f"--rows-per-unit {' '.join(map(str, sizes))}")
    print(f"{args.images} images 32x32, torchvision:{args.arch}, batch {args.batch_size}, 1 torch thread per process, "
          f"features on; medians of {args.rounds} interleaved rounds; ratio = median [min, max] of per-round ratios")
    print("loader workers | run | rows/s (steady) | rows/s (end to end) | ratio")
    for w, run in runs.items():
        plain = med(run["plain"])
        print(f"{w} | plain forward | {plain:,.0f} | - | 1.00")
        for u in sizes:
            one = {key: med(o[key] for o in run["one"][u]) for key in run["one"][u][0]}
            of_plain = [o["steady_rows_per_s"] / p for o, p in zip(run["one"][u], run["plain"])]
            print(f"{w} | dump, 1 worker, {u}-row units | {one['steady_rows_per_s']:,.0f} | "
                  f"{one['end_to_end_rows_per_s']:,.0f} | {med(of_plain):.2f} [{min(of_plain):.2f}, {max(of_plain):.2f}] of plain")
        two = {key: med(t[key] for t in run["two"]) for key in run["two"][0]}
        scaling = [t["steady_rows_per_s"] / o["steady_rows_per_s"] for t, o in zip(run["two"], run["one"][sizes[0]])]
        print(f"{w} | dump, 2 workers, {sizes[0]}-row units | {two['steady_rows_per_s']:,.0f} | "
              f"{two['end_to_end_rows_per_s']:,.0f} | {med(scaling):.2f}x [{min(scaling):.2f}, {max(scaling):.2f}] of 1 worker")
    print(f"store: {two['bytes_per_sample']:.0f} B/sample (k=10, 4 temperatures, 512-d penultimate fp16 features)")
    ray.shutdown()


if __name__ == "__main__":
    main()
