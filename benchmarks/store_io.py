"""Store I/O: bulk write, bulk read, random-batch reads and bytes per sample.

    python benchmarks/store_io.py                      # 1M rows, C=1000, k=10, fp16 and compact codecs
    python benchmarks/store_io.py --rows 200000 --layouts 65536/8192,65536/65536,4096/4096 --codecs fp16

Teacher-like logits: z = 2·N(0,1) + 6·onehot(y) per row (a confident teacher, ~88 % top-1 mass
at T=1), C=1000, normalised and top-k'd exactly as the dump does. All timings in one process,
side by side (random reads interleaved across codecs), so ratios are meaningful on a noisy machine. With both codecs, it also reports the
compact codec's fidelity: per stored T the mean and max per-row KL(fp16 targets || compact
targets) of the KD-topk target the losses build, and the top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from softlabels.stores import StoreSchema, StoreWriter, open_store
from softlabels.stores import format as fmt
from softlabels.stores.codecs.compact import target_fidelity
from softlabels.targets import summarize_logits

TEMPS = (1.0, 2.0, 4.0, 8.0)
FIELDS = [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP, fmt.LABEL_LOGIT, fmt.LABELS]


def make_unit(start: int, stop: int, classes: int, k: int, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    n = stop - start
    labels = torch.randint(0, classes, (n,), generator=g)
    z = 2.0 * torch.randn(n, classes, generator=g)
    z[torch.arange(n), labels] += 6.0
    f = summarize_logits(z.unsqueeze(1), k, TEMPS, labels.unsqueeze(1))
    out = {name: t.numpy() for name, t in f.items()}
    out[fmt.LABELS] = labels.numpy()
    return out


def chunk_window_order(rows: int, chunk: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle chunk order, then rows within consecutive windows of ``window`` chunks."""
    chunks = rng.permutation(-(-rows // chunk))
    parts = []
    for w in range(0, chunks.size, window):
        idx = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, rows)) for c in chunks[w : w + window]])
        parts.append(rng.permutation(idx))
    return np.concatenate(parts)


def bench_layout(root: Path, rows: int, classes: int, k: int, shard: int, chunk: int, batches: int,
                 codec: str = "fp16") -> dict:
    path = root / f"store-{codec}-{shard}-{chunk}.zarr"
    schema = StoreSchema(num_samples=rows, num_classes=classes, k=k, temperatures=TEMPS,
                         rows_per_shard=shard, rows_per_chunk=chunk, teacher={"spec": "bench"},
                         dataset={"spec": "bench"}, codec=None if codec == "fp16" else {"name": codec})
    units = [make_unit(*schema.unit_range(u), classes, k, seed=0) for u in range(schema.num_units)]
    writer = StoreWriter.create(path, schema)
    t0 = time.perf_counter()
    for u, fields in enumerate(units):
        writer.mark_complete(u, writer.write_unit(u, fields))
    write_s = time.perf_counter() - t0
    writer.finalize()
    del units

    per_array = {}
    for spec in schema.per_sample_arrays():
        per_array[spec.name] = sum(f.stat().st_size for f in (path / spec.name).rglob("*") if f.is_file()) / rows
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    store = open_store(path)
    t0 = time.perf_counter()
    for name in FIELDS:
        store.load(name)
    bulk_read_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    idx_batches = [rng.integers(0, rows, 256) for _ in range(batches)]

    # Larger-than-cache stores: an LRU of decoded chunks holding ~1/4 of the decoded store.
    quarter = int(0.25 * rows * 64)
    small_cache = open_store(path, cache_bytes=quarter)
    few = idx_batches[: max(1, batches // 10)]
    t0 = time.perf_counter()
    for idx in few:
        small_cache.read(idx, FIELDS, view=0, temperature=4.0)
    small_s = time.perf_counter() - t0
    # ... read in the trainer's chunk-aware shuffle order (chunk order shuffled, rows shuffled
    # within windows of 4 chunks): every chunk is decoded about once per epoch.
    chunked = open_store(path, cache_bytes=quarter)
    order = chunk_window_order(rows, chunk, window=4, rng=np.random.default_rng(1))[: batches * 256]
    t0 = time.perf_counter()
    for start in range(0, order.size, 256):
        chunked.read(order[start : start + 256], FIELDS, view=0, temperature=4.0)
    chunked_s = time.perf_counter() - t0

    raw = open_store(path)
    naive_batches = idx_batches[:5]
    t0 = time.perf_counter()
    for idx in naive_batches:
        for spec in schema.per_sample_arrays():
            raw.array(spec.name).oindex[np.sort(idx)]
    naive_s = time.perf_counter() - t0

    n_read = batches * 256
    return {
        "codec": codec,
        "path": str(path),
        "layout": f"{shard}/{chunk}",
        "rows": rows,
        "bulk_write_rows_per_s": rows / write_s,
        "bulk_read_rows_per_s": rows / bulk_read_s,
        "random_batch_quarter_cache_rows_per_s": len(few) * 256 / small_s,
        "chunk_shuffle_quarter_cache_rows_per_s": order.size / chunked_s,
        "random_batch_naive_zarr_rows_per_s": len(naive_batches) * 256 / naive_s,
        "bytes_per_row": total / rows,
        "bytes_per_row_by_array": per_array,
    }


def interleaved_random_reads(paths: dict[str, str], rows: int, batches: int, rounds: int = 10) -> dict:
    """Random batches of 256 rows, from the store (a fresh handle: includes decoding every chunk
    once) and preloaded in memory, for every codec in alternation (``rounds`` slices of the
    batches each), so that the machine's load hits every codec alike."""
    rng = np.random.default_rng(0)
    idx_batches = [rng.integers(0, rows, 256) for _ in range(batches)]
    handles = {c: {"store": open_store(p), "memory": open_store(p).preload(FIELDS)} for c, p in paths.items()}
    seconds = {c: {"store": 0.0, "memory": 0.0} for c in paths}
    for r in range(rounds):
        part = idx_batches[r::rounds]
        for mode in ("store", "memory"):
            for codec, h in handles.items():
                t0 = time.perf_counter()
                for idx in part:
                    h[mode].read(idx, FIELDS, view=0, temperature=4.0)
                seconds[codec][mode] += time.perf_counter() - t0
    return {c: {f"random_batch_{m}_rows_per_s": batches * 256 / s for m, s in per.items()} for c, per in seconds.items()}


def fidelity(reference: str, compact: str, classes: int) -> dict:
    """KL(fp16 targets || compact targets) per T over every row, and top-1 agreement."""
    a, b = open_store(reference), open_store(compact)
    total = np.zeros((len(TEMPS), 4))
    maxima = np.zeros(len(TEMPS))
    names = [fmt.TOPK_VALUES, fmt.TOPK_INDICES, fmt.LOGSUMEXP]
    for unit in range(a.schema.num_units):
        rows = np.arange(*a.schema.unit_range(unit))
        fa, fb = a.read(rows, names), b.read(rows, names)
        assert np.array_equal(fa[fmt.TOPK_INDICES], fb[fmt.TOPK_INDICES]), "indices are lossless"
        part = target_fidelity(fa, fb, TEMPS, classes)
        total += part
        maxima = np.maximum(maxima, part[:, 1])
    return {f"{t:g}": {"kl_mean": total[j, 0] / total[j, 2], "kl_max": maxima[j], "top1_agreement": total[j, 3] / total[j, 2]}
            for j, t in enumerate(TEMPS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batches", type=int, default=2000, help="random batches of 256 rows")
    p.add_argument("--layouts", default="65536/8192", help="comma-separated rows_per_shard/rows_per_chunk")
    p.add_argument("--codecs", default="fp16,compact", help="comma-separated target codecs, measured side by side")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    load_start = os.getloadavg()
    results = []
    codecs = args.codecs.split(",")
    fid = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            shard, chunk = (int(x) for x in layout.split("/"))
            for codec in codecs:
                results.append(bench_layout(Path(tmp), args.rows, args.classes, args.k, shard, chunk, args.batches, codec))
            rates = interleaved_random_reads({r["codec"]: r["path"] for r in results[-len(codecs):]}, args.rows, args.batches)
            for r in results[-len(codecs):]:
                r.update(rates[r["codec"]])
            if {"fp16", "compact"} <= set(codecs):
                paths = {r["codec"]: r["path"] for r in results[-len(codecs):]}
                fid[layout] = fidelity(paths["fp16"], paths["compact"], args.classes)
    if args.json:
        print(json.dumps({"results": results, "fidelity": fid}, indent=2))
        return
    load_end = os.getloadavg()
    print(f"$ python benchmarks/store_io.py --rows {args.rows} --batches {args.batches} --layouts {args.layouts} "
          f"--codecs {args.codecs}")
    print(f"rows={args.rows:,} C={args.classes} k={args.k} T={list(TEMPS)}; random batches of 256 rows; "
          f"load average (1 min) {load_start[0]:.1f} at start, {load_end[0]:.1f} at end on {os.cpu_count()} CPUs")
    head = ["codec layout", "B/row", "rand store r/s", "rand mem r/s", "bulk write r/s", "bulk read r/s",
            "rand 1/4-cache r/s", "chunk-shuffle 1/4-cache r/s", "naive zarr r/s"]
    print("\n" + " | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in results:
        print(" | ".join([
            f"{r['codec']} {r['layout']}", f"{r['bytes_per_row']:.1f}", f"{r['random_batch_store_rows_per_s']:,.0f}",
            f"{r['random_batch_memory_rows_per_s']:,.0f}", f"{r['bulk_write_rows_per_s']:,.0f}",
            f"{r['bulk_read_rows_per_s']:,.0f}", f"{r['random_batch_quarter_cache_rows_per_s']:,.0f}",
            f"{r['chunk_shuffle_quarter_cache_rows_per_s']:,.0f}", f"{r['random_batch_naive_zarr_rows_per_s']:,.0f}",
        ]))
    print()
    for r in results:
        print(f"bytes/row by array, {r['codec']} {r['layout']}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["bytes_per_row_by_array"].items()))
    for layout, per_t in fid.items():
        print(f"\nfidelity of compact vs fp16 ({layout}), per-row KL(fp16 targets || compact targets):")
        print("T | KL mean | KL max | top-1 agreement %")
        print("--- | --- | --- | ---")
        for t, f in per_t.items():
            print(f"{t} | {f['kl_mean']:.2e} | {f['kl_max']:.2e} | {100 * f['top1_agreement']:.3f}")
    compact = [r for r in results if r["codec"] == "compact"]
    if compact:
        print("\ntargets (issue 17), compact codec:")
    for r in compact:
        fp16 = next((x for x in results if x["codec"] == "fp16" and x["layout"] == r["layout"]), None)
        ratio = f" ({r['random_batch_store_rows_per_s'] / fp16['random_batch_store_rows_per_s']:.2f}x fp16)" if fp16 else ""
        checks = [("<= 20 B/row", r["bytes_per_row"], r["bytes_per_row"] <= 20, "{:.1f} B/row"),
                  (">= 200k rows/s random from the store", r["random_batch_store_rows_per_s"],
                   r["random_batch_store_rows_per_s"] >= 200_000, "{:,.0f} rows/s" + ratio),
                  (">= 1M rows/s random in memory", r["random_batch_memory_rows_per_s"],
                   r["random_batch_memory_rows_per_s"] >= 1_000_000, "{:,.0f} rows/s")]
        for what, value, ok, fmt_ in checks:
            print(f"  {r['layout']} {what}: {'met' if ok else 'NOT met'}, {fmt_.format(value)}")

if __name__ == "__main__":
    main()
