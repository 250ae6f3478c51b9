"""Checkpoints and resume (kill -9 then --resume gives bit-identical weights; a resume with other
arguments is refused), the streaming path (a tiny preload budget gives the same batches and
weights as preloading), and the recipe's pieces (parameter groups, warm-up, checkpoint format)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from softlabels.checkpoint import load_checkpoint
from softlabels.datasets import load_dataset
from softlabels.data import DistillDataset, StoreBatchSampler, store_dataset_metadata
from softlabels.errors import SpecError
from softlabels.losses import build_method
from softlabels.models import build_model
from softlabels.recipe import Recipe, build_optimizer, build_scheduler, param_groups
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.train import train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A random-init MLP teacher's store over digits' train split, in chunks of 128 rows."""
    train, info = load_dataset("digits", "train")
    torch.manual_seed(0)
    teacher = build_model("mlp", info.input_shape, 10)
    with torch.no_grad():
        logits = teacher(train.inputs).numpy() * 4
    path = tmp_path_factory.mktemp("resume") / "digits.zarr"
    write_store_from_logits(path, logits, k=10, temperatures=(1.0, 4.0), labels=info.labels,
                            teacher={"spec": "builtin:mlp", "num_classes": 10},
                            dataset=store_dataset_metadata(info), rows_per_chunk=128, rows_per_shard=256)
    return path


def _cli(store, out, *extra):
    return [sys.executable, "-m", "softlabels.cli.app", "train", "--store", str(store), "--dataset", "digits",
            "--student", "builtin:mlp", "--method", "kd", "--epochs", "3", "--batch-size", "16", "--optimizer",
            "sgd", "--lr", "0.05", "--weight-decay", "1e-4", "--warmup-epochs", "1", "--quiet", "--out", str(out),
            *extra]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_kill_9_then_resume_is_bit_identical(digits_store, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train_student(str(digits_store), "digits", "builtin:mlp", "kd", epochs=3, batch_size=16, progress=False,
                  recipe=Recipe(optimizer="sgd", lr=0.05, weight_decay=1e-4, warmup_epochs=1),
                  out_dir=tmp_path / "ref")  # the same run as _cli's, uninterrupted, in this process (1 thread)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(digits_store, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "student.pt").exists(), "the run finished before it was killed; the test proves nothing"
    info, _ = load_checkpoint(run / "checkpoint.pt")
    assert 1 <= info["epoch"] < 3

    resumed = subprocess.run(_cli(digits_store, run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "ref" / "student.pt"), _weights(run / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    assert mb["recipe"]["resumed_from_epoch"] == info["epoch"]


def test_resume_refuses_other_arguments(digits_store, tmp_path):
    common = dict(store_path=str(digits_store), dataset_spec="digits", student_arch="builtin:mlp", method="kd",
                  batch_size=64, progress=False, out_dir=tmp_path / "o")
    with pytest.raises(SpecError, match=r"^--resume: there is no checkpoint at .*checkpoint.pt; run without --resume"):
        train_student(**common, epochs=1, resume=True)
    train_student(**common, epochs=1, recipe=Recipe(lr=0.01))
    payload = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)  # no pickle needed
    assert payload["format"] == "softlabels-checkpoint" and set(payload["rng"]) == {"torch", "numpy", "python", "cuda"}
    with pytest.raises(SpecError) as exc:
        train_student(**common, epochs=2, recipe=Recipe(lr=0.02, optimizer="sgd"), resume=True)
    assert str(exc.value) == (
        f"cannot resume from {tmp_path / 'o' / 'checkpoint.pt'}: the arguments differ (--epochs 1 in the checkpoint, "
        "2 now; --lr 0.01 in the checkpoint, 0.02 now; --optimizer \"adam\" in the checkpoint, \"sgd\" now); "
        "rerun with the checkpoint's arguments, or train into a new --out"
    )


def test_streaming_gives_the_preloaded_batches_and_weights(digits_store, tmp_path):
    train, info = load_dataset("digits", "train")
    method = build_method("kd", num_classes=10)
    preloaded = DistillDataset.for_method(train, str(digits_store), method, info=info)
    streamed = DistillDataset.for_method(train, str(digits_store), method, info=info, preload_bytes=0)
    assert preloaded.preloaded_all and not streamed.preloaded_all and streamed.preloaded == ()
    sampler = StoreBatchSampler(streamed, 100, shuffle="chunks", seed=3)
    sampler.set_epoch(1)
    for indices in sampler:
        a, b = preloaded.__getitems__(indices), streamed.__getitems__(indices)
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["label"], b["label"])
        assert a["targets"].keys() == b["targets"].keys()
        assert all(torch.equal(a["targets"][n], b["targets"][n]) for n in a["targets"])

    common = dict(store_path=str(digits_store), dataset_spec="digits", student_arch="builtin:mlp", method="kd",
                  epochs=2, batch_size=64, progress=False)
    m_stream = train_student(**common, max_preload_bytes=1000, out_dir=tmp_path / "s")  # auto -> chunk order
    m_pre = train_student(**common, shuffle="chunks", out_dir=tmp_path / "p")
    assert m_stream["recipe"]["preloaded"] is False and m_stream["recipe"]["shuffle"] == "chunks"
    assert m_pre["recipe"]["preloaded"] is True
    a, b = _weights(tmp_path / "s" / "student.pt"), _weights(tmp_path / "p" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_parameter_groups_and_schedule():
    model = build_model("cnn", (3, 8, 8), 4)
    decay, no_decay = param_groups([model], 0.05)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3 * 2 + 1  # 3 BN (weight, bias), fc bias
    assert param_groups([model], 0.0)[0]["params"] == list(model.parameters())

    def lrs_of(recipe, steps_per_epoch, epochs):
        opt = build_optimizer(recipe, [model])
        sched = build_scheduler(recipe, opt, steps_per_epoch=steps_per_epoch, epochs=epochs)
        out = []
        for _ in range(steps_per_epoch * epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    lrs = lrs_of(Recipe(optimizer="sgd", lr=0.1, warmup_epochs=1, schedule="cosine"), 10, 3)
    assert lrs[0] == pytest.approx(0.001) and lrs[10] == pytest.approx(0.1)  # warm-up from 0.01 x lr, per step
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0) and lrs[-1] < 0.002
    seen = lrs_of(Recipe(lr=0.1, schedule="step", decay_epochs=1, decay_rate=0.5), 4, 3)
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)
    for bad, message in [(dict(optimizer="lamb"), "unknown optimizer 'lamb'; choose one of: adam, adamw, sgd"),
                         (dict(schedule="poly"), "unknown schedule 'poly'; choose one of: cosine, step, constant"),
                         (dict(weight_decay=-1.0), "--weight-decay -1 must be >= 0"),
                         (dict(grad_clip=0.0), "--grad-clip 0 must be > 0 (omit it to not clip)")]:
        with pytest.raises(SpecError) as exc:
            Recipe(**bad)
        assert str(exc.value) == message


def test_store_targets_joins_a_plain_dataset_by_index(digits_store):
    from softlabels.api import StoreTargets, build_method
    from softlabels.data import StoreDatasetMismatchError

    train, info = load_dataset("digits", "train")

    class Plain(torch.utils.data.Dataset):  # what a user has: item i -> (x, y), labels as a list
        def __init__(self, order):
            self.order, self.targets = order, [int(info.labels[i]) for i in order]

        def __len__(self):
            return len(self.order)

        def __getitem__(self, i):
            return train.inputs[self.order[i]], self.targets[i]

    method = build_method("kd", str(digits_store), temperature=4)
    assert method.num_classes == 10
    data = StoreTargets(Plain(list(range(len(train)))), str(digits_store), method)
    x, y, targets = next(iter(torch.utils.data.DataLoader(data, batch_size=32, num_workers=0)))
    assert x.shape == (32, 1, 8, 8) and torch.equal(y, torch.as_tensor(info.labels[:32]))
    reference = DistillDataset.for_method(train, str(digits_store), method, info=info).__getitems__(list(range(32)))
    assert all(torch.equal(targets[n], reference["targets"][n]) for n in targets)
    assert float(method(torch.zeros(32, 10), y, targets).total) > 0

    shuffled = list(np.random.default_rng(0).permutation(len(train)))
    with pytest.raises(StoreDatasetMismatchError, match="labels differ in value or order"):
        StoreTargets(Plain(shuffled), str(digits_store), method)
