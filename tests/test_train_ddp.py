"""`softlabels train` under torchrun (DistributedDataParallel on CPU with gloo, 2 ranks).

The exactness test: 2 ranks at --batch-size 64 end with the weights of one process at
--batch-size 128 over the same global order. The shares of the epoch order are disjoint and
cover it. Two ranks read one s3:// store. A killed rank stops the run quickly with one line,
leaves no process behind, and the run resumes from its checkpoint to the same weights.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.data import DistillDataset, StoreBatchSampler, store_dataset_metadata
from softlabels.datasets import load_dataset
from softlabels.recipe import Recipe
from softlabels.stores import open_store
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.train import train_student
from test_remote import _url, s3  # noqa: F401 - the shared moto S3 server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOLDOUT = "0.2"  # digits: 1437 train rows - 287 held out = 1150, an even number (no padding row)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A store of noisy teacher logits and features for the digits train split."""
    train, info = load_dataset("digits", "train")
    g = np.random.default_rng(0)
    n = info.num_samples
    logits = g.normal(0, 2, (n, 10)).astype(np.float32)
    logits[np.arange(n), info.labels] += 3
    path = tmp_path_factory.mktemp("ddp") / "digits.zarr"
    write_store_from_logits(
        path, logits, k=10, temperatures=(1.0, 4.0), labels=info.labels,
        features={"penultimate": g.normal(size=(n, 16)).astype(np.float32)},
        teacher={"spec": "builtin:mlp", "checkpoint_sha256": "0" * 64, "num_classes": 10},
        dataset=store_dataset_metadata(info), rows_per_chunk=128, rows_per_shard=256,
    )
    return path


def _children(root: int) -> list[int]:
    """Every descendant of ``root`` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out += [child]
            todo.append(child)
    return out


def _rank_pids(root: int) -> dict[int, int]:
    found = {}
    for pid in _children(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = pid
    return found


class Torchrun:
    """``torchrun --standalone --nproc-per-node 2 -m softlabels train ...`` in a subprocess; every
    process it started is tracked so that the test can assert none is left behind."""

    def __init__(self, args, *, nproc=2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "softlabels", "train", *map(str, args), "--quiet", "--threads", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.seen: set[int] = set()

    def track(self) -> dict[int, int]:
        ranks = _rank_pids(self.proc.pid)
        self.seen |= set(_children(self.proc.pid)) | set(ranks.values())
        return ranks

    def wait(self, timeout=180):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            for pid in [*self.seen, self.proc.pid]:  # a failing test must not leave ranks running
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.proc.returncode, out, err

    def left_behind(self) -> list[int]:
        return [pid for pid in self.seen if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def _run_and_check(args, timeout=180):
    run = Torchrun(args)
    while run.proc.poll() is None and not run.track():
        time.sleep(0.02)
    code, out, err = run.wait(timeout)
    assert code == 0, err[-3000:]
    return out, err


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())


# ---------------------------------------------------------------------------------------------
# the shares of the epoch order (no processes: every rank's sampler is built here)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [True, "chunks"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("pad", [True, False])
def test_rank_shares_are_disjoint_and_cover_the_epoch(mode, world, pad):
    class Rows:  # a dataset of 1001 rows in store chunks of 64 (1001 is divisible by neither 2 nor 3)
        def __len__(self):
            return 1001

        def chunk_bounds(self):
            return np.append(np.arange(0, 1001, 64), 1001)

    n, per_rank = 1001, (-(-1001 // world) if pad else 1001 // world)
    for epoch in (0, 3):
        shares = []
        for rank in range(world):
            sampler = StoreBatchSampler(Rows(), 50, shuffle=mode, seed=7, rank=rank, world_size=world, pad=pad)
            sampler.set_epoch(epoch)
            batches = [list(b) for b in sampler]
            assert len(batches) == len(sampler)
            shares.append(np.concatenate(batches))
        assert all(s.size == per_rank for s in shares)  # every rank takes the same number of steps
        union = np.concatenate(shares)
        order = StoreBatchSampler(Rows(), 50, shuffle=mode, seed=7)
        order.set_epoch(epoch)
        full = np.concatenate([list(b) for b in order])
        if pad:  # every row exactly once, plus the start of the order repeated (as DistributedSampler)
            extra = per_rank * world - n
            assert sorted(union.tolist()) == sorted(list(range(n)) + full[:extra].tolist())
        else:  # the tail is dropped (DistributedSampler's drop_last): disjoint, fewer than `world` rows missing
            assert len(set(union.tolist())) == union.size and n - union.size < world
        if mode is True and pad:  # step i of the ranks together = step i of one process at world x the batch
            big = StoreBatchSampler(Rows(), 50 * world, shuffle=True, seed=7)
            big.set_epoch(epoch)
            padded = np.concatenate([full, full[: per_rank * world - n]])
            for i, batch in enumerate(big):
                got = np.concatenate([s[i * 50 : (i + 1) * 50] for s in shares])
                assert sorted(got.tolist()) == sorted(padded[i * 50 * world : (i + 1) * 50 * world].tolist())
                if i * 50 * world + 50 * world <= n:
                    assert sorted(got.tolist()) == sorted(list(batch))


def test_a_streamed_rank_reads_only_the_chunks_of_its_share(digits_store):
    """Chunk mode: each rank's contiguous block of the chunk-aware order touches about 1/world of
    the store's chunks, and the store reads of a real streamed dataset touch exactly those."""
    train, info = load_dataset("digits", "train")
    store = open_store(digits_store)
    from softlabels.losses import build_method

    method = build_method("kd", num_classes=10)
    data = DistillDataset.for_method(train, store, method, info=info, preload_bytes=0)
    assert not data.preloaded_all
    rows_per_chunk = store.schema.rows_per_chunk
    n_chunks = -(-len(data) // rows_per_chunk)
    read_chunks = []
    for rank in range(2):
        sampler = StoreBatchSampler(data, 32, shuffle="chunks", seed=0, rank=rank, world_size=2)
        seen: set[int] = set()
        original = store.read

        def spy(index, *args, **kwargs):
            seen.update((np.asarray(index) // rows_per_chunk).tolist())
            return original(index, *args, **kwargs)

        store.read = spy
        try:
            share = set()
            for batch in sampler:
                data.__getitems__(batch)
                share.update(np.asarray(list(batch)) // rows_per_chunk)
        finally:
            store.read = original
        assert seen == share  # the rank read the chunks its share touches, no others
        read_chunks.append(seen)
    assert read_chunks[0] | read_chunks[1] == set(range(n_chunks))
    # read twice: at most the window of 4 chunks that straddles the two blocks, plus the chunk of
    # the one padding row (1437 rows, 2 ranks): each rank reads about half of the store
    assert len(read_chunks[0] & read_chunks[1]) <= 4 + 1 < n_chunks
    assert all(len(chunks) <= n_chunks // 2 + 5 for chunks in read_chunks)


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------
COMMON = ["--dataset", "digits", "--optimizer", "sgd", "--lr", "0.05", "--holdout", HOLDOUT]


def test_two_ranks_at_batch_64_equal_one_process_at_batch_128(digits_store, tmp_path):
    """DDP averages exactly what one process computes: the student and the hint regressor (a
    trainable loss parameter) after 2 epochs of 2 ranks x 64 equal 1 process x 128 to 1e-5."""
    hint = ["--method", "hint", "--hparam", "kd_weight=1", "--student", "builtin:mlp"]
    out, err = _run_and_check(["--store", digits_store, *COMMON, *hint, "--epochs", "2", "--batch-size", "64",
                               "--out", tmp_path / "ddp"])
    assert "distributed: 2 ranks (gloo, cpu), --batch-size 64 per rank, global batch 128" in err
    assert out.count("hint: holdout accuracy") == 1  # rank 0 alone reports
    ref = train_student(str(digits_store), "digits", "builtin:mlp", "hint", hparams={"kd_weight": 1}, epochs=2,
                        batch_size=128, recipe=Recipe(optimizer="sgd", lr=0.05), holdout=float(HOLDOUT),
                        out_dir=tmp_path / "one", progress=False, warn=lambda m: None)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert (ddp["world_size"], ddp["global_batch_size"], ddp["steps"]) == (2, 128, ref["steps"]) == (2, 128, 18)
    _assert_close(_weights(tmp_path / "ddp" / "student.pt"), _weights(tmp_path / "one" / "student.pt"))
    regressors = [_weights(tmp_path / d / "checkpoint.pt")["loss"] for d in ("ddp", "one")]
    assert any(k.startswith("regressor") for k in regressors[0])
    _assert_close(*regressors)
    for a, b in zip(ddp["history"], ref["history"]):  # the epoch loss is the mean over every rank's rows
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)


def test_a_killed_rank_stops_the_run_with_one_line_and_it_resumes(digits_store, tmp_path):
    """SIGKILL rank 1 mid-run: the run exits non-zero well within --dist-timeout, rank 0 says
    which rank died in one line, no process is left; --resume on 2 ranks then finishes with the
    weights of one uninterrupted process at twice the batch."""
    args = ["--store", digits_store, *COMMON, "--method", "kd", "--epochs", "12", "--batch-size", "32",
            "--dist-timeout", "20", "--out", tmp_path / "ddp"]
    run = Torchrun(args)
    checkpoint = tmp_path / "ddp" / "checkpoint.pt"
    while not checkpoint.exists():
        assert run.proc.poll() is None, run.proc.communicate()[1][-3000:]
        run.track()
        time.sleep(0.01)
    ranks = run.track()
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code, _, err = run.wait(timeout=60)
    elapsed = time.monotonic() - killed_at
    assert code != 0 and elapsed < 20, (code, elapsed)
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0/2: rank 1 died, so this rank stops"), err[-3000:]
    assert not run.left_behind()
    epoch = json.loads(torch.load(checkpoint, weights_only=True)["json"])["epoch"]
    assert 1 <= epoch < 12  # killed mid-run

    _run_and_check([*args, "--resume"])
    ref = tmp_path / "one"
    train_student(str(digits_store), "digits", "builtin:mlp", "kd", epochs=12, batch_size=64,
                  recipe=Recipe(optimizer="sgd", lr=0.05), holdout=float(HOLDOUT), out_dir=ref, progress=False,
                  warn=lambda m: None)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["recipe"]["resumed_from_epoch"] == epoch and len(metrics["history"]) == 12
    _assert_close(_weights(tmp_path / "ddp" / "student.pt"), _weights(ref / "student.pt"))


def _readme_torchrun() -> list[str]:
    """The README's torchrun line: ``torchrun --nproc-per-node 8 -m softlabels train ARGS``; returns ARGS."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:6] == ["torchrun", "--nproc-per-node", "8", "-m", "softlabels", "train"], words
    return words[6:]


def test_two_ranks_read_one_s3_store(digits_store, s3, cli, tmp_path):  # noqa: F811 - the fixture
    """The README's torchrun command (on 2 ranks, digits, a store on the local S3 server)."""
    url = _url("digits.zarr")
    code, _, err = cli("copy", digits_store, url, *s3["flags"], "--quiet")
    assert code == 0, err
    swap = {"s.zarr": url, "mnist1d": "digits", "runs/kd-ddp": str(tmp_path / "s3")}
    args = [swap.get(word, word) for word in _readme_torchrun()]
    assert args.count(url) == args.count("digits") == 1 and "kd" in args
    _run_and_check([*args, *s3["flags"], "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--holdout", HOLDOUT])
    metrics = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    assert metrics["store_path"] == url and metrics["world_size"] == 2
    # each rank read its own rows' targets from S3: the weights are those of one process on the local copy
    train_student(str(digits_store), "digits", "builtin:mlp", "kd", epochs=1, batch_size=128,
                  recipe=Recipe(optimizer="sgd", lr=0.05), holdout=float(HOLDOUT), out_dir=tmp_path / "one",
                  progress=False, warn=lambda m: None)
    _assert_close(_weights(tmp_path / "s3" / "student.pt"), _weights(tmp_path / "one" / "student.pt"))
