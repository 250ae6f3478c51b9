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

On a machine with a GPU (not measured here: this machine has none)::

    python benchmarks/dump_overhead.py --device cuda            # resnet50 at 224 px, bf16, 16,384 rows

``--device cuda`` measures the same ratio for a GPU teacher: torchvision resnet50 (1,000
classes, random init) at 224 px under the dump's bf16 autocast, on *synthetic* inputs so that
decoding does not set the pace: each row is an 8-d ``synthetic`` input that selects one of 64
random 224 px images held on the GPU (``synthetic_image_teacher``), and the plain forward runs the
same module over the same in-memory batches. The dump uses one Ray actor per GPU and stores
k = 10, 4 temperatures and the 2,048-d penultimate features. ``--inputs synthetic --device cpu``
runs that path on the CPU (a smoke test: ``--arch resnet18 --size 32 --images 512 --rounds 1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC_TEACHER = "benchmarks.dump_overhead:synthetic_image_teacher"
_IMAGES_ENV = "SOFTLABELS_BENCH_IMAGES"  # "arch:size" for synthetic_image_teacher (read in the driver)


class SyntheticImageTeacher(nn.Module):
    """A torchvision classifier on synthetic images: row ``x`` picks one of ``pool`` random
    images (held as a buffer, so on the teacher's device) by the low bits of ``x[0]``."""

    def __init__(self, arch: str, size: int, num_classes: int, pool: int = 64) -> None:
        import torchvision

        super().__init__()
        self.register_buffer("images", torch.randn(pool, 3, size, size, generator=torch.Generator().manual_seed(0)))
        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, 0].contiguous().view(torch.int32) & (self.images.shape[0] - 1)
        return self.net(self.images.index_select(0, rows.long()))


def synthetic_image_teacher(num_classes: int = 1000) -> nn.Module:
    arch, size = os.environ.get(_IMAGES_ENV, "resnet50:224").split(":")
    torch.manual_seed(0)
    return SyntheticImageTeacher(arch, int(size), num_classes)


def synthetic_spec(images: int) -> str:
    return f"synthetic:num_classes=1000,superclasses=4,dim=8,difficulty=0,train_samples={images}"


def plain_forward_synthetic(spec: str, device: str, batch_size: int) -> float:
    """Rows/s of the teacher alone on ``device`` (bf16 autocast on CUDA, as the dump), over the
    same in-memory batches the dump's predictor slices."""
    from softlabels.datasets import load_dataset
    from softlabels.device import autocast_for
    from softlabels.teachers import load_teacher

    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    dataset, info = load_dataset(spec, "train")
    model = load_teacher(SYNTHETIC_TEACHER, None, input_shape=info.input_shape, num_classes=info.num_classes).model
    model = model.to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast_for(dev):
        model(dataset.inputs[:batch_size].to(dev))  # warm-up (cuDNN autotune, allocator)
        sync()
        t0 = time.perf_counter()
        for s in range(0, info.num_samples, batch_size):
            model(dataset.inputs[s : s + batch_size].to(dev, non_blocking=True))
        sync()
    return info.num_samples / (time.perf_counter() - t0)


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


def dump(spec: str, weights: str | None, teacher: str, out: str, workers: int, batch_size: int, loader_workers: int = 0,
         rows_per_unit: int = 256, threads_per_worker: int = 1) -> dict:
    from softlabels.pipelines.dump import run_dump
    from softlabels.pipelines.predictor import DumpConfig

    config = DumpConfig(teacher=teacher, weights=weights, dataset=spec, out=out, k=10,
                        batch_size=batch_size, threads_per_worker=threads_per_worker, rows_per_shard=rows_per_unit,
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
    p.add_argument("--images", type=int, default=None, help="rows (default 4096; 16384 with --device cuda)")
    p.add_argument("--arch", default=None, help="torchvision arch (default resnet18; resnet50 with --device cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128; 256 with --device cuda")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 0],
                   help="decoding processes per dump worker (and the plain forward's num_workers); 1 is the dump default")
    p.add_argument("--rows-per-unit", type=int, nargs="+", default=None,
                   help="rows per unit (= per shard) of the 1-worker dump; the 2-worker dump uses the first "
                        "(default 256; 1024 with --inputs synthetic)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: a GPU teacher (implies --inputs synthetic, resnet50 at 224 px, bf16 autocast)")
    p.add_argument("--inputs", choices=["imagefolder", "synthetic"], default=None,
                   help="imagefolder: decoded 32x32 photos (default on cpu); synthetic: pre-made images, no decoding")
    p.add_argument("--size", type=int, default=None, help="image side for --inputs synthetic (default 224)")
    p.add_argument("--workers", type=int, default=0, help="--inputs synthetic: workers of the multi-worker dump "
                   "(default: one per GPU; none when it would be 1)")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.images = args.images or (16384 if gpu else 4096)
    args.arch = args.arch or ("resnet50" if gpu else "resnet18")
    args.batch_size = args.batch_size or (256 if gpu else 128)
    if gpu or args.inputs == "synthetic":
        return main_synthetic(args)
    sizes = args.rows_per_unit or [256]
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
                    runs[w]["one"][u].append(dump(spec, weights, f"torchvision:{args.arch}", str(out / f"one{u}.zarr"), 1,
                                                  args.batch_size, w, u))
                runs[w]["two"].append(dump(spec, weights, f"torchvision:{args.arch}", str(out / "two.zarr"), 2,
                                           args.batch_size, w, sizes[0]))
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


def main_synthetic(args: argparse.Namespace) -> None:
    """Dump vs plain forward of ``synthetic_image_teacher`` on ``args.device``: interleaved rounds."""
    import ray

    size = args.size or 224
    sizes = args.rows_per_unit or [1024]
    os.environ[_IMAGES_ENV] = f"{args.arch}:{size}"
    # Ray workers unpickle the teacher: they import benchmarks.dump_overhead from the repository root.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(**({"num_cpus": 2} if args.device == "cpu" else {}), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if args.device == "cuda" and not gpus:
        raise SystemExit("--device cuda: Ray sees no GPU on this machine")
    many = args.workers or (gpus if gpus > 1 else 0)
    threads = 1 if args.device == "cpu" else 0  # on a GPU the worker keeps torch's default threads
    spec = synthetic_spec(args.images)
    runs: dict = {"plain": [], "one": {u: [] for u in sizes}, "many": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            out = Path(tmp) / f"r{r}"
            runs["plain"].append(plain_forward_synthetic(spec, args.device, args.batch_size))
            for u in sizes if r % 2 == 0 else sizes[::-1]:
                runs["one"][u].append(dump(spec, None, SYNTHETIC_TEACHER, str(out / f"one{u}.zarr"), 1, args.batch_size,
                                           0, u, threads))
            if many:
                runs["many"].append(dump(spec, None, SYNTHETIC_TEACHER, str(out / "many.zarr"), many, args.batch_size,
                                         0, sizes[0], threads))
            ones = ", ".join(f"{runs['one'][u][-1]['steady_rows_per_s']:,.0f} ({u}-row units)" for u in sizes)
            print(f"round {r + 1}: plain {runs['plain'][-1]:,.0f} rows/s, dump 1 worker {ones}", flush=True)
    med = statistics.median
    print(f"$ python benchmarks/dump_overhead.py --device {args.device} --inputs synthetic --arch {args.arch} "
          f"--size {size} --images {args.images} --batch-size {args.batch_size} --rounds {args.rounds} "
          f"--rows-per-unit {' '.join(map(str, sizes))}" + (f" --workers {many}" if many else ""))
    autocast = "bf16 autocast" if args.device == "cuda" else "float32, 1 torch thread per process"
    print(f"{args.images} synthetic {size}px images, torchvision:{args.arch} (1,000 classes), {args.device}, {autocast}, "
          f"batch {args.batch_size}, penultimate features on; medians of {args.rounds} interleaved rounds")
    print("run | rows/s (steady) | rows/s (end to end) | ratio")
    print(f"plain forward | {med(runs['plain']):,.0f} | - | 1.00")
    for u in sizes:
        one = runs["one"][u]
        of_plain = [o["steady_rows_per_s"] / p for o, p in zip(one, runs["plain"])]
        print(f"dump, 1 worker, {u}-row units | {med(o['steady_rows_per_s'] for o in one):,.0f} | "
              f"{med(o['end_to_end_rows_per_s'] for o in one):,.0f} | "
              f"{med(of_plain):.2f} [{min(of_plain):.2f}, {max(of_plain):.2f}] of plain")
    if many:
        scaling = [m["steady_rows_per_s"] / o["steady_rows_per_s"] for m, o in zip(runs["many"], runs["one"][sizes[0]])]
        print(f"dump, {many} workers, {sizes[0]}-row units | {med(m['steady_rows_per_s'] for m in runs['many']):,.0f} | "
              f"{med(m['end_to_end_rows_per_s'] for m in runs['many']):,.0f} | "
              f"{med(scaling):.2f}x [{min(scaling):.2f}, {max(scaling):.2f}] of 1 worker")
    print(f"store: {runs['one'][sizes[0]][-1]['bytes_per_sample']:.0f} B/sample")
    ray.shutdown()


if __name__ == "__main__":
    main()
