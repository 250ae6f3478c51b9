"""The compact target codec (docs/FORMAT.md §8): the coding options it was chosen from, and
what it costs and keeps on real stores.

    python benchmarks/compact_codec.py options                  # coding options, 1 shard of teacher-like rows
    python benchmarks/compact_codec.py mnist1d --out codec-out  # stores, views, students (3 seeds)
    python benchmarks/compact_codec.py students --out codec-out --seeds 20  # students only, many seeds

``options``: one 65,536-row shard of benchmarks/store_io.py's teacher-like rows (C = 1,000, k = 10,
T = 1,2,4,8), each candidate coding compressed in 8,192-row chunks exactly as the store's inner
chunks are (blosc/zstd from numcodecs, the library zarr's codecs call), in B/row; and the
fidelity (mean/max per-row KL(fp16 || compact) of the KD-topk target) of each quantisation step.

``mnist1d``: the demo's teacher (builtin CNN, 40 epochs), dumped with both codecs over the train
split (k = 10, T = 1,2,4,8) and with V = 1 and V = 8 shift views (k = 10, T = 4, no features);
bytes per sample and per extra view; the view coding options on the V = 8 rows; the demo's KD
T = 4 and KD-topk k = 3 students from the fp16 and the compact train store, same seeds.

``students``: the same students from the train stores in ``--out`` (dumped when missing), plus a
control: KD T = 4 from a **float32** store, whose targets differ from the fp16 store's by rounding
alone. Seeds 0..N-1 per arm (same seed = same init and batch order); each run is appended to
``students.jsonl`` there as it finishes, and a rerun skips the runs already recorded. Prints
each arm's mean and standard error, and the paired differences (compact - fp16, float32 - fp16)
with their standard error: the control's difference is the noise floor a codec's has to beat.
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
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc, Zstd

sys.path.insert(0, str(Path(__file__).parent))
from store_io import TEMPS, make_unit  # noqa: E402

from softlabels.stores import format as fmt  # noqa: E402
from softlabels.stores.codecs.compact import CompactCodec, target_fidelity  # noqa: E402

CHUNK = 8192
SHUFFLES = {"none": Blosc.NOSHUFFLE, "byte": Blosc.SHUFFLE, "bit": Blosc.BITSHUFFLE}


def chunked_bytes(arr: np.ndarray, how: str, transpose: bool = False) -> float:
    """B/row of ``arr`` [n, ...] compressed in 8,192-row chunks: ``blosc-<shuffle>`` (zstd, clevel
    9) or ``zstd-<level>``; ``transpose``: each column contiguous within the chunk (zarr's
    ``transpose`` codec, order [1, ..., 0])."""
    total = 0
    for start in range(0, arr.shape[0], CHUNK):
        block = arr[start : start + CHUNK]
        block = np.ascontiguousarray(np.moveaxis(block, 0, -1) if transpose else block)
        if how.startswith("blosc"):
            total += len(Blosc(cname="zstd", clevel=9, shuffle=SHUFFLES[how.split("-")[1]]).encode(block))
        else:
            total += len(Zstd(level=int(how.split("-")[1])).encode(block.tobytes()))
    return total / arr.shape[0]


def best(arr: np.ndarray) -> tuple[str, float, dict[str, float]]:
    sizes = {}
    for how in ("blosc-none", "blosc-byte", "blosc-bit", "zstd-3", "zstd-9", "zstd-19"):
        for t in (False, True):
            if t and arr.ndim < 2:
                continue
            sizes[how + ("+transpose" if t else "")] = chunked_bytes(arr, how, t)
    name = min(sizes, key=sizes.get)
    return name, sizes[name], sizes


def lehmer(order: np.ndarray) -> np.ndarray:
    k = order.shape[1]
    code = np.zeros(order.shape[0], np.int64)
    for i in range(k):
        code = code * (k - i) + (order[:, i + 1 :] < order[:, i : i + 1]).sum(1)
    return code


def options(rows: int) -> dict:
    u = make_unit(0, rows, 1000, 10, seed=0)
    fields = {n: a for n, a in u.items() if n != fmt.LABELS}
    idx = u[fmt.TOPK_INDICES][:, 0].astype(np.int64)
    order = np.argsort(idx, axis=1)
    asc = np.take_along_axis(idx, order, 1)
    deltas = np.diff(asc, axis=1, prepend=0)
    labels = u[fmt.LABELS].astype(np.int64)
    candidates = {
        "indices: value order, uint16 (fp16 codec's)": idx.astype(np.uint16),
        "indices: (id - label) mod C, uint16": ((idx - labels[:, None]) % 1000).astype(np.uint16),
        "indices: ascending, deltas uint16": deltas.astype(np.uint16),
        "indices: ascending, deltas low byte": (deltas & 255).astype(np.uint8),
        "indices: ascending, deltas high byte": (deltas >> 8).astype(np.uint8),
        "  + permutation: value rank of each ascending id, uint8": order.astype(np.uint8),
        "  + permutation: Lehmer code, uint32": lehmer(order).astype(np.uint32),
        "labels int32": labels.astype(np.int32),
    }
    ref = {n: a.astype(np.float16) if n == fmt.TOPK_VALUES else a for n, a in fields.items()}
    fidelity = {}
    for step in (0.25, 0.125, 0.0625):
        for tail_step in (0.25, 0.125):
            codec = CompactCodec(1000, 10, TEMPS, logp_step=step, tail_step=tail_step)
            raw = codec.encode(fields)
            fid = target_fidelity(ref, codec.decode(raw, [fmt.TOPK_VALUES, fmt.LOGSUMEXP]), TEMPS, 1000)
            fidelity[f"logp_step {step}, tail_step {tail_step}"] = {
                f"{t:g}": [fid[j, 0] / fid[j, 2], fid[j, 1]] for j, t in enumerate(TEMPS)}
            if tail_step != 0.125:
                continue
            q = np.cumsum(raw["compact/logp_gaps"][:, 0], axis=1)
            candidates[f"values step {step}: q (descending log-prob below top-1), uint8"] = q[:, 1:].astype(np.uint8)
            candidates[f"values step {step}: gaps q[r] - q[r-1], uint16 (stored)"] = raw["compact/logp_gaps"][:, 0]
            candidates[f"values step {step}: gaps q[r] - q[r-1], as uint8"] = raw["compact/logp_gaps"][:, 0].astype(np.uint8)
            candidates[f"label logit step {step}: label_gap, uint16"] = raw["compact/label_gap"][:, 0]
        codec = CompactCodec(1000, 10, TEMPS)
    raw = codec.encode(fields)
    candidates["tail log-odds step 0.125, [n, 4] uint8"] = raw["compact/tail"][:, 0]
    lse = fields[fmt.LOGSUMEXP][:, 0]
    candidates["(fp16 codec) logsumexp float32 [n, 4]"] = lse.astype(np.float32)
    candidates["(fp16 codec) topk_values float16"] = fields[fmt.TOPK_VALUES][:, 0].astype(np.float16)
    table = {}
    for name, arr in candidates.items():
        how, size, sizes = best(arr)
        table[name] = {"best": how, "bytes_per_row": size, "all": sizes}
    return {"rows": rows, "sizes": table, "fidelity": fidelity}


def print_options(res: dict) -> None:
    print(f"coding options, {res['rows']:,} teacher-like rows (C=1000, k=10, T=1,2,4,8), 8,192-row chunks:")
    print("| candidate | best codec | B/row | blosc-none | blosc-byte | blosc-bit | blosc-bit+transpose | zstd-19 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res["sizes"].items():
        a = r["all"]
        cols = [f"{a.get(k, float('nan')):.2f}" for k in ("blosc-none", "blosc-byte", "blosc-bit", "blosc-bit+transpose", "zstd-19")]
        print(f"| {name} | {r['best']} | **{r['bytes_per_row']:.2f}** | " + " | ".join(cols) + " |")
    print("\nfidelity, KL(fp16 || compact) of the KD-topk target, per-row mean / max:")
    print("| steps | " + " | ".join(f"T={t:g}" for t in TEMPS) + " |")
    print("|---|" + "---|" * len(TEMPS))
    for name, per_t in res["fidelity"].items():
        print(f"| {name} | " + " | ".join(f"{m:.1e} / {x:.1e}" for m, x in per_t.values()) + " |")


# -- mnist1d ---------------------------------------------------------------------------
def softlabels(*args: str) -> None:
    print("$ softlabels " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "softlabels.cli.app", *args], check=True)


def store_bytes(path: Path) -> float:
    from softlabels.stores import open_store

    store = open_store(path)
    return store.bytes_on_disk() / store.num_samples


def view_options(path: Path) -> dict:
    """Coding options for the per-view arrays of a V = 8 store (logical fields from its fp16 store)."""
    from softlabels.stores import open_store

    store = open_store(path)
    f = store.read(np.arange(store.num_samples), [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP, fmt.LABEL_LOGIT])
    codec = CompactCodec(store.num_classes, store.k, store.temperatures)
    raw = codec.encode(f)
    ids = f[fmt.TOPK_INDICES].astype(np.int64)
    gaps = raw["compact/logp_gaps"].astype(np.int64)
    c = store.num_classes
    cands = {
        "indices, every view absolute (chosen)": raw["compact/indices"],
        "indices, views > 0 as (id_v - id_0) mod C": np.concatenate(
            [ids[:, :1], (ids[:, 1:] - ids[:, :1]) % c], axis=1).astype(raw["compact/indices"].dtype),
        "logp_gaps, every view its own (chosen)": raw["compact/logp_gaps"],
        "logp_gaps, views > 0 as (g_v - g_0) mod 65536": np.concatenate(
            [gaps[:, :1], (gaps[:, 1:] - gaps[:, :1]) % 65536], axis=1).astype(np.uint16),
        "label_gap": raw["compact/label_gap"],
    }
    return {name: {"best": b[0], "bytes_per_row": b[1], "blosc-none": b[2]["blosc-none"]}
            for name, arr in cands.items() for b in [best(arr)]}


def _train_one(job: tuple) -> dict:
    from softlabels.train import train_student

    torch.set_num_threads(1)
    store, method, seed, epochs, opts, out = job[:6]
    with tempfile.TemporaryDirectory(dir=out) as run_dir:
        m = train_student([store], "mnist1d", "builtin:mlp", method, epochs=epochs, seed=seed, out_dir=run_dir,
                          progress=False, temperature=opts.get("temperature"), k=opts.get("k"))
    return {"test_accuracy": m["test_accuracy"]}


def dump(path: Path, reuse_fp16: bool, *args: str) -> None:
    """``softlabels dump ... --out path``; with ``reuse_fp16``, a complete fp16 store already there is kept."""
    if reuse_fp16 and "fp16" in args and path.exists():
        from softlabels.stores import open_store

        if open_store(path, allow_incomplete=True).meta.status == "complete":
            print(f"reusing {path}")
            return
    softlabels("dump", *args, "--out", str(path))


def mnist1d(out: Path, seeds: int, epochs: int, reuse_fp16: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher.pt"
    if not teacher.exists():
        softlabels("teacher", "fit", "--dataset", "mnist1d", "--arch", "cnn", "--epochs", "40", "--seed", "0",
                   "--out", str(teacher))
    common = ["--teacher", "builtin:cnn", "--weights", str(teacher), "--dataset", "mnist1d", "--split", "train",
              "--workers", "2", "--k", "10", "--quiet", "--overwrite"]
    stores = {}
    for codec in ("fp16", "compact"):
        stores[f"train-{codec}"] = out / f"train-{codec}.zarr"
        dump(stores[f"train-{codec}"], reuse_fp16, *common, "--temperatures", "1,2,4,8", "--codec", codec)
        for v in (1, 8):
            path = stores[f"views{v}-{codec}"] = out / f"views{v}-{codec}.zarr"
            aug = ["--views", "8", "--augment", "shift1d:max=6"] if v == 8 else []
            dump(path, reuse_fp16, *common, "--temperatures", "4", "--no-features", *aug, "--codec", codec)
    sizes = {name: store_bytes(path) for name, path in stores.items()}
    per_view = {codec: (sizes[f"views8-{codec}"] - sizes[f"views1-{codec}"]) / 7 for codec in ("fp16", "compact")}
    from softlabels.stores import open_store

    recorded = {name: open_store(path).meta.summary.get("codec_fidelity") for name, path in stores.items()}
    a, b = (open_store(stores[f"train-{c}"]) for c in ("fp16", "compact"))
    rows = np.arange(a.num_samples)
    names = [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP]
    fid = target_fidelity(a.read(rows, names), b.read(rows, names), a.temperatures, a.num_classes)
    vs_fp16 = {f"{t:g}": {"kl_mean": fid[j, 0] / fid[j, 2], "kl_max": fid[j, 1], "top1": fid[j, 3] / fid[j, 2]}
               for j, t in enumerate(a.temperatures)}
    runs = [("KD T=4", "kd", {"temperature": 4.0}), ("KD-topk k=3 T=4", "kd-topk", {"temperature": 4.0, "k": 3})]
    jobs = [(str(stores[f"train-{codec}"]), method, seed, epochs, opts, str(out))
            for _, method, opts in runs for codec in ("fp16", "compact") for seed in range(seeds)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        accs = [r["test_accuracy"] for r in pool.map(_train_one, jobs)]
    students = {}
    for i, (label, _, _) in enumerate(runs):
        fp16, compact = accs[2 * i * seeds : (2 * i + 1) * seeds], accs[(2 * i + 1) * seeds : (2 * i + 2) * seeds]
        students[label] = {"fp16": fp16, "compact": compact,
                           "mean_fp16": statistics.mean(fp16), "mean_compact": statistics.mean(compact),
                           "paired_diffs": [c - f for f, c in zip(fp16, compact)]}
    return {"bytes_per_sample": sizes, "bytes_per_extra_view": per_view, "recorded_fidelity": recorded,
            "fidelity_vs_fp16": vs_fp16, "view_options": view_options(stores["views8-fp16"]), "students": students}


STUDENT_ARMS = [("KD T=4", "kd", {"temperature": 4.0}, ("fp16", "compact", "fp32")),
                ("KD-topk k=3 T=4", "kd-topk", {"temperature": 4.0, "k": 3}, ("fp16", "compact"))]


def students(out: Path, seeds: int, epochs: int, workers: int) -> dict:
    """Many-seed students from the fp16, compact and float32 train stores (see the module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--teacher", "builtin:cnn", "--weights", str(out / "teacher.pt"), "--dataset", "mnist1d", "--split",
              "train", "--workers", "2", "--k", "10", "--quiet", "--overwrite", "--temperatures", "1,2,4,8"]
    if not (out / "teacher.pt").exists():
        softlabels("teacher", "fit", "--dataset", "mnist1d", "--arch", "cnn", "--epochs", "40", "--seed", "0",
                   "--out", str(out / "teacher.pt"))
    extra = {"fp16": ["--codec", "fp16"], "compact": ["--codec", "compact"], "fp32": ["--value-dtype", "float32"]}
    for store, flags in extra.items():
        if not (out / f"train-{store}.zarr").exists():
            softlabels("dump", *common, *flags, "--out", str(out / f"train-{store}.zarr"))
    log = out / "students.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["epochs"] == epochs:
                done[(r["arm"], r["store"], r["seed"])] = r["test_accuracy"]
    jobs = [(str(out / f"train-{store}.zarr"), method, seed, epochs, opts, str(out), label, store)
            for seed in range(seeds) for label, method, opts, stores in STUDENT_ARMS for store in stores
            if (label, store, seed) not in done]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool, log.open("a") as f:
        for job, r in zip(jobs, pool.map(_train_one, jobs)):
            row = {"arm": job[6], "store": job[7], "seed": job[2], "epochs": epochs, **r}
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[(row["arm"], row["store"], row["seed"])] = r["test_accuracy"]
    res = {}
    for label, _, _, stores in STUDENT_ARMS:
        accs = {s: [100 * done[(label, s, seed)] for seed in range(seeds)] for s in stores}
        res[label] = {"accuracy": {s: _mean_se(a) for s, a in accs.items()}, "runs": accs,
                      "paired_vs_fp16": {s: _mean_se([x - y for x, y in zip(accs[s], accs["fp16"])])
                                         for s in stores if s != "fp16"}}
    return {"seeds": seeds, "epochs": epochs, "students": res}


def _mean_se(xs: list[float]) -> list[float]:
    """``[mean, standard error of the mean]``."""
    return [statistics.mean(xs), statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")]


def print_students(res: dict) -> None:
    print(f"students, {res['seeds']} seeds per arm, {res['epochs']} epochs: test accuracy %, mean ± standard error")
    print("| student | store | accuracy | paired difference vs fp16 |")
    print("|---|---|---|---|")
    for label, r in res["students"].items():
        for store, (m, se) in r["accuracy"].items():
            diff = r["paired_vs_fp16"].get(store)
            d = f"{diff[0]:+.2f} ± {diff[1]:.2f}" if diff else ""
            print(f"| {label} | {store} | {m:.2f} ± {se:.2f} | {d} |")


def print_mnist1d(res: dict) -> None:
    print("bytes/sample:", json.dumps({k: round(v, 1) for k, v in res["bytes_per_sample"].items()}))
    print("bytes per extra view (V=8 vs V=1):", json.dumps({k: round(v, 1) for k, v in res["bytes_per_extra_view"].items()}))
    print("train store, KL(fp16 || compact):", json.dumps(res["fidelity_vs_fp16"]))
    print("view coding options (V=8):", json.dumps(res["view_options"]))
    for label, s in res["students"].items():
        print(f"{label}: fp16 {100 * s['mean_fp16']:.2f} {[round(100 * a, 1) for a in s['fp16']]}, compact "
              f"{100 * s['mean_compact']:.2f} {[round(100 * a, 1) for a in s['compact']]}, compact - fp16 "
              f"{100 * (s['mean_compact'] - s['mean_fp16']):+.2f} points")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["options", "mnist1d", "students"])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--out", default="codec-out")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--workers", type=int, default=2, help="students: training processes at once")
    p.add_argument("--reuse-fp16", action="store_true", help="keep complete fp16 stores (and the teacher) already in --out")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.what == "options":
        res = options(args.rows)
        print_options(res)
    elif args.what == "students":
        res = students(Path(args.out), args.seeds, args.epochs, args.workers)
        print_students(res)
    else:
        res = mnist1d(Path(args.out), args.seeds, args.epochs, args.reuse_fp16)
        print_mnist1d(res)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.what}.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
