"""Training students from stores: the CLI end to end (without ever touching the teacher),
exactness against online KD, determinism, transfer-set training, hint modes, user errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from softlabels.cli.app import app
from softlabels.datasets import load_dataset
from softlabels.data import DistillDataset, store_dataset_metadata
from softlabels.errors import InvalidTargetsError, SoftlabelsError, SpecError, StoreNotFoundError
from softlabels.fit import fit_classifier
from softlabels.losses import build_method, kd_loss
from softlabels.models import build_model
from softlabels.stores.from_logits import write_store_from_logits
from softlabels.train import train_student

REQUIRED = {"test_accuracy", "method", "epochs", "seed", "wall_seconds", "history", "temperature", "k",
            "store_path", "store_bytes_per_sample", "hparams"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _teacher_outputs(model, inputs):
    feats = {}
    handle = model.classifier.register_forward_pre_hook(lambda m, a: feats.__setitem__("x", a[0].flatten(1)))
    with torch.no_grad():
        logits = model(inputs)
    handle.remove()
    return logits.numpy(), feats["x"].numpy()


def _dump(path, model, dataset, info, *, k=10, value_dtype="float16", teacher_meta=None):
    logits, feats = _teacher_outputs(model, dataset.inputs)
    write_store_from_logits(
        path,
        logits,
        k=k,
        temperatures=(1.0, 2.0, 4.0),
        labels=info.labels,
        features={"penultimate": feats},
        classifier_weight=model.classifier.weight.detach().numpy(),
        classifier_bias=model.classifier.bias.detach().numpy(),
        value_dtype=value_dtype,
        teacher=teacher_meta or {"spec": "builtin:mlp", "checkpoint_sha256": "0" * 64, "num_classes": 10},
        dataset=store_dataset_metadata(info),
    )
    return path, logits


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """An MLP teacher fitted on digits (~95% test accuracy), its weights file and its store."""
    root = tmp_path_factory.mktemp("train")
    train, info = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    torch.manual_seed(0)
    teacher = build_model("mlp", info.input_shape, 10)
    result = fit_classifier(teacher, train, test, epochs=8, seed=0, progress=False)
    assert result["test_accuracy"] > 0.9
    weights = root / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    meta = {"spec": "builtin:mlp", "checkpoint_sha256": "0" * 64, "num_classes": 10, "weights": str(weights)}
    store, logits = _dump(root / "digits.zarr", teacher, train, info, teacher_meta=meta)
    return {"root": root, "teacher": teacher, "store": store, "logits": logits, "weights": weights}


# ---------------------------------------------------------------------------------------------
# The CLI end to end, in a fresh interpreter that never imports or opens the teacher
# ---------------------------------------------------------------------------------------------
def test_cli_train_writes_metrics_without_touching_the_teacher(digits_teacher, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json, sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        from softlabels.cli.app import main
        sys.argv = ["softlabels", "train", "--store", {str(digits_teacher['store'])!r}, "--dataset", "digits",
                    "--student", "builtin:mlp", "--method", "kd", "--temperature", "2", "--epochs", "4",
                    "--seed", "1", "--quiet", "--out", {str(out)!r}]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        print(json.dumps({{"modules": sorted(m for m in sys.modules if m.startswith("softlabels")), "opened": opened}}))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert "softlabels.teachers" not in report["modules"]
    assert "softlabels.train" in report["modules"]
    assert str(digits_teacher["weights"]) not in report["opened"]
    assert not [p for p in report["opened"] if p.endswith(".pt") and not p.endswith("student.pt")]
    assert "kd: test accuracy" in r.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert REQUIRED <= set(metrics)
    assert metrics["method"] == "kd" and metrics["epochs"] == 4 and metrics["seed"] == 1
    assert metrics["temperature"] == 2.0 and metrics["k"] == 10
    assert metrics["hparams"] == {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_accuracy"] > 0.7  # chance is 0.1
    assert len(metrics["history"]) == 4 and all("test_accuracy" in h for h in metrics["history"])
    assert metrics["store_bytes_per_sample"] > 0 and metrics["wall_seconds"] > 0
    student = build_model("mlp", (1, 8, 8), 10)
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------
# Exactness: KD from a full-k store == online KD with the dense teacher logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value_dtype,rtol", [("float32", 1e-5), ("float16", 1e-3)])
def test_kd_from_full_k_store_equals_online_kd(digits_teacher, tmp_path, value_dtype, rtol):
    train, info = load_dataset("digits", "train")
    store, logits = _dump(tmp_path / f"{value_dtype}.zarr", digits_teacher["teacher"], train, info, value_dtype=value_dtype)
    method = build_method("kd", temperature=2.0, ce_weight=0.3, kd_weight=0.7, num_classes=10)
    data = DistillDataset.for_method(train, store, method, info=info)
    idx = np.random.default_rng(0).permutation(len(train))[:256]
    batch = data.__getitems__(list(idx))
    torch.manual_seed(0)
    student = build_model("mlp", info.input_shape, 10)
    student_logits = student(batch["input"])
    from_store = method(student_logits, batch["label"], batch["targets"])
    teacher_probs = torch.softmax(torch.as_tensor(logits[idx]) / 2.0, dim=-1)
    online = kd_loss(student_logits, teacher_probs, torch.as_tensor(info.labels[idx]), temperature=2.0,
                     ce_weight=0.3, kd_weight=0.7)
    assert torch.allclose(from_store.total, online.total, rtol=rtol, atol=0)
    assert torch.allclose(from_store.components["kd"], online.components["kd"], rtol=rtol, atol=0)
    g_store = torch.autograd.grad(from_store.total, student_logits, retain_graph=True)[0]
    g_online = torch.autograd.grad(online.total, student_logits)[0]
    assert float((g_store - g_online).abs().max()) <= 10 * rtol * float(g_online.abs().max())


# ---------------------------------------------------------------------------------------------
# The recipe in-process
# ---------------------------------------------------------------------------------------------
def test_training_is_deterministic_and_ce_needs_no_store(digits_teacher, tmp_path):
    kwargs = dict(epochs=2, seed=3, batch_size=64, lr=1e-2, progress=False)
    a = train_student(digits_teacher["store"], "digits", "builtin:mlp", "kd-topk", k=3, out_dir=tmp_path / "a", **kwargs)
    b = train_student(digits_teacher["store"], "digits", "mlp", "kd-topk", k=3, out_dir=tmp_path / "b", **kwargs)
    assert a["k"] == 3 and a["hparams"]["k"] == 3
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    sa, sb = torch.load(tmp_path / "a" / "student.pt"), torch.load(tmp_path / "b" / "student.pt")
    assert all(torch.equal(sa[key], sb[key]) for key in sa)
    workers = train_student(digits_teacher["store"], "digits", "mlp", "kd-topk", k=3, out_dir=tmp_path / "w",
                            num_workers=2, **kwargs)
    assert [h["loss"] for h in workers["history"]] == [h["loss"] for h in a["history"]]
    ce = train_student(None, "digits", "builtin:mlp", "ce", out_dir=tmp_path / "ce", **kwargs)
    assert ce["store_path"] is None and ce["temperature"] is None and ce["store_bytes_per_sample"] is None
    assert ce["test_accuracy"] > 0.5


@pytest.mark.parametrize("mode", ["joint", "two-stage"])
def test_hint_modes_are_reported(digits_teacher, tmp_path, mode):
    m = train_student(digits_teacher["store"], "digits", "builtin:mlp", "hint", epochs=3, seed=0, out_dir=tmp_path,
                      hparams={"mode": mode}, progress=False)
    assert m["hint_mode"] == mode
    assert m["hint_stages"] == (["main"] if mode == "joint" else ["hint", "kd"])
    assert m["hparams"]["feature"] == "features/penultimate"
    assert [h["stage"] for h in m["history"]] == (["main"] * 3 if mode == "joint" else ["hint", "kd", "kd"])
    assert "hint" in m["history"][0]["components"]


def test_transfer_set_training(tmp_path):
    spec = "mnist1d:num_samples=300,transfer_samples=600"
    train, info = load_dataset(spec, "train")
    transfer, transfer_info = load_dataset(spec, "transfer")
    torch.manual_seed(0)
    teacher = build_model("mlp", info.input_shape, 10)
    s_train, _ = _dump(tmp_path / "train.zarr", teacher, train, info)
    s_transfer, _ = _dump(tmp_path / "transfer.zarr", teacher, transfer, transfer_info)
    m = train_student([s_train, s_transfer], spec, "builtin:mlp", "kd", temperature=1.0, epochs=2, seed=0,
                      out_dir=tmp_path / "out", hparams={"ce_weight": 0.0, "kd_weight": 1.0}, progress=False)
    assert m["train_samples"] == 840 and m["labelled_samples"] == 240 and m["unlabeled_samples"] == 600
    assert m["train_splits"] == ["train", "transfer"] and len(m["stores"]) == 2
    assert m["stores"][1]["labeled"] is False
    # transfer only, pure KD: every batch is unlabeled
    only = train_student(s_transfer, spec, "builtin:mlp", "kd", epochs=1, out_dir=tmp_path / "t", progress=False)
    assert "ce" not in only["history"][0]["components"]
    with pytest.raises(InvalidTargetsError) as e:
        train_student([s_train, s_transfer], spec, "builtin:mlp", "kd-pt", epochs=1, out_dir=tmp_path / "x",
                      progress=False)
    assert str(e.value) == (
        f"method 'kd-pt' needs ground-truth labels but store {s_transfer} covers the unlabeled 'transfer' split; "
        "use kd or kd-topk (no labels needed) or drop that store"
    )
    with pytest.raises(SpecError, match="two stores cover the same split"):
        train_student([s_train, s_train], spec, "builtin:mlp", "kd", epochs=1, out_dir=tmp_path / "y", progress=False)


# ---------------------------------------------------------------------------------------------
# User mistakes: one clear SoftlabelsError each
# ---------------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(app, ["train", *map(str, args), "--quiet", "--epochs", "1"])


def test_cli_user_errors(digits_teacher, tmp_path):
    store = digits_teacher["store"]
    base = ["--dataset", "digits", "--out", tmp_path / "o"]
    cases = [
        (["--store", tmp_path / "nope.zarr", "--method", "kd"], StoreNotFoundError,
         f"store {tmp_path / 'nope.zarr'} does not exist; check the path (or run `softlabels dump` first)"),
        (["--store", store, "--method", "kd", "--temperature", "3"], SoftlabelsError,
         "temperature 3 is not in the store's grid [1,2,4]; train at one of those or re-dump with --temperatures 1,2,4,3"),
        (["--store", store, "--method", "kd-topk", "--k", "11"], SoftlabelsError,
         f"k=11 but store {store} only holds the top-10 logits; use --k <= 10 or re-dump with --k 11"),
        (["--store", store, "--method", "dark-knowledge"], SpecError,
         "unknown method 'dark-knowledge'; choose one of: ce, hint, kd, kd-pt, kd-pt+sim, kd-sim, kd-topk, ls"),
        (["--store", store, "--method", "kd", "--student", "builtin:transformer"], SpecError,
         "unknown student spec 'builtin:transformer'; built-in archs: cnn, linear, mlp, resmlp, resnet20, resnet56, tangmlp-128, tangmlp-16, tangmlp-256, "
         "tangmlp-32, tangmlp-512, tangmlp-64, tangmlp-8 (any other student: "
         "builtin:<arch>, torchvision:<arch>, timm:<arch> or package.module:factory)"),
        (["--method", "kd"], SpecError,
         "method 'kd' reads teacher targets from a store; pass --store (a `softlabels dump` output)"),
        (["--store", store, "--method", "kd", "--hparam", "alpha=0.5"], SpecError,
         "method 'kd' has no hyperparameter(s) ['alpha']; it takes: ce_weight, kd_weight, num_classes, temperature"),
    ]
    for args, kind, message in cases:
        result = _cli(*args, *base)
        assert isinstance(result.exception, kind), (args, result.exception, result.output)
        assert str(result.exception) == message


def test_cli_error_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "softlabels.cli.app", "train", "--store", str(tmp_path / "missing.zarr"),
         "--dataset", "digits", "--method", "kd", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: store {tmp_path / 'missing.zarr'} does not exist; check the path (or run `softlabels dump` first)"
    ]
