"""The demo's hint row with and without normalising the stored teacher features (issue 19).

    nice -n 5 python benchmarks/hint_normalisation.py --store demo-out/mnist1d-train.zarr --seeds 3

Same student, budget and seeds as `make demo`'s hint row (40-100-100-10 MLP, 60 epochs, Adam 1e-2
with cosine decay, batch 128, CE 1 + hint 100 on the stored penultimate features); the runs with
and without `normalize` are interleaved, two single-threaded processes at a time. Prints the first
epoch's hint loss (its scale is what normalising fixes) and the test accuracy, mean ± std.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import tempfile


def _one(job: tuple) -> dict:
    import torch

    from softlabels.train import train_student

    torch.set_num_threads(1)
    store, normalize, seed, epochs = job
    with tempfile.TemporaryDirectory() as out:
        metrics = train_student(store, "mnist1d", "builtin:mlp", "hint", epochs=epochs, seed=seed, out_dir=out,
                                progress=False, hparams={"normalize": normalize})
    first = metrics["history"][0]
    return {"normalize": normalize, "seed": seed, "accuracy": metrics["test_accuracy"],
            "first_epoch_loss": first["loss"], "first_epoch_hint": first.get("components", {}).get("hint")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    jobs = [(args.store, normalize, seed, args.epochs) for seed in range(args.seeds) for normalize in (True, False)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_one, jobs))
    print(json.dumps(results, indent=1))
    for normalize in (True, False):
        rows = [r for r in results if r["normalize"] == normalize]
        accs = [100 * r["accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"normalize={normalize}: test accuracy {statistics.mean(accs):.1f} ± {std:.1f} %, first-epoch hint "
              f"loss {statistics.mean(r['first_epoch_hint'] or float('nan') for r in rows):.4g}")


if __name__ == "__main__":
    main()
