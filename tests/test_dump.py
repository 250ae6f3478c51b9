"""`softlabels dump`: Ray workers write exactly what the teacher computes in-process; a killed
dump resumes to identical arrays; a killed actor is retried; bad inputs fail in one line."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from softlabels.datasets import load_dataset
from softlabels.errors import SoftlabelsError
from softlabels.pipelines.dump import run_dump
from softlabels.pipelines.predictor import DumpConfig, TeacherPredictor
from softlabels.stores import open_store
from softlabels.stores.verify import verify_store
from softlabels.targets import summarize_logits
from softlabels.teachers import FeatureRecorder, load_teacher

DATASET = "mnist1d:num_samples=3000"  # 2,400 train rows: 10 units of 256 rows
ARRAYS = ["topk_values", "topk_indices", "logsumexp", "label_logit", "labels", "features/penultimate"]


def _config(out, weights, **kw):
    base = dict(teacher="builtin:cnn", weights=str(weights), dataset=DATASET, out=str(out), k=5,
                temperatures=(1.0, 4.0), batch_size=64, threads_per_worker=1)
    base.update(kw)
    return DumpConfig(**base)


def _arrays(path):
    store = open_store(path)
    return {name: store.array(name)[...] for name in ARRAYS}


def test_ray_dump_equals_in_process_teacher(ray_session, tmp_path, mnist1d_teacher):
    result = run_dump(_config(tmp_path / "s", mnist1d_teacher), workers=2)
    dataset, info = load_dataset(DATASET, "train")
    store = open_store(tmp_path / "s")
    assert result.rows == info.num_samples == store.num_samples == 2400
    assert result.units_written == store.schema.num_units == 10
    teacher = load_teacher("builtin:cnn", str(mnist1d_teacher), input_shape=(40,), num_classes=10)
    with torch.inference_mode(), FeatureRecorder(teacher.model, {"penultimate": "penultimate"}) as rec:
        logits = teacher.model(dataset.inputs)
        feats = rec.features["penultimate"]
    ref = summarize_logits(logits, 5, (1.0, 4.0), torch.as_tensor(info.labels))
    got = _arrays(tmp_path / "s")
    np.testing.assert_array_equal(got["topk_indices"][:, 0], ref["topk_indices"].numpy())
    np.testing.assert_allclose(got["topk_values"][:, 0], ref["topk_values"].numpy(), atol=4e-3, rtol=1e-3)
    np.testing.assert_allclose(got["logsumexp"][:, 0], ref["logsumexp"].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["label_logit"][:, 0], ref["label_logit"].numpy(), atol=4e-3, rtol=1e-3)
    np.testing.assert_array_equal(got["labels"], info.labels)
    np.testing.assert_allclose(got["features/penultimate"][:, 0], feats.numpy(), atol=2e-3, rtol=1e-3)
    meta = store.meta
    assert meta.teacher["spec"] == "builtin:cnn" and len(meta.teacher["checkpoint_sha256"]) == 64
    assert meta.dataset["spec"].startswith("mnist1d:num_samples=3000") and meta.dataset["split"] == "train"
    assert meta.summary["teacher_top1_accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == info.labels).mean()))
    w, _ = store.classifier()
    np.testing.assert_array_equal(w, teacher.model.classifier.weight.detach().numpy())
    assert verify_store(tmp_path / "s").ok


def kill_actor_process(actor) -> int:
    """SIGKILL the process of a live actor (a real crash, not a mock)."""
    import ray

    pid = ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def test_actor_killed_mid_run_is_retried(ray_session, tmp_path, mnist1d_teacher):
    killed = []
    store_path = tmp_path / "s"

    def on_actors(actors):
        def killer():
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    done = zarr.open_array(str(store_path / "units" / "complete"), mode="r")[:]
                except Exception:  # noqa: BLE001 - store not created yet
                    done = np.zeros(1)
                if done.sum() >= 2:
                    killed.append(kill_actor_process(actors[0]))
                    return
                time.sleep(0.01)

        threading.Thread(target=killer, daemon=True).start()

    config = _config(store_path, mnist1d_teacher, batch_size=16)
    run_dump(config, workers=2, on_actors=on_actors)
    assert killed, "the actor was never killed: the dump finished too fast to test anything"
    reference = tmp_path / "ref"
    run_dump(_config(reference, mnist1d_teacher, batch_size=16), workers=1)
    got, want = _arrays(store_path), _arrays(reference)
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert verify_store(store_path).ok


CLI = [sys.executable, "-m", "softlabels.cli.app"]


def _dump_cmd(out, weights, *extra):
    return [*CLI, "dump", "--teacher", "builtin:cnn", "--weights", str(weights), "--dataset", DATASET,
            "--out", str(out), "--k", "5", "--temperatures", "1,4", "--batch-size", "16", "--workers", "2",
            "--quiet", *extra]


@pytest.mark.parametrize("kill_after_units", [0, 5])
def test_kill_9_then_resume_gives_identical_arrays(ray_session, tmp_path, mnist1d_teacher, kill_after_units):
    out = tmp_path / "s"
    proc = subprocess.Popen(_dump_cmd(out, mnist1d_teacher), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = np.zeros(1)
    while time.time() < deadline and proc.poll() is None:
        try:
            done = zarr.open_array(str(out / "units" / "complete"), mode="r")[:]
        except Exception:  # noqa: BLE001 - not created yet
            time.sleep(0.01)
            continue
        if done.sum() >= kill_after_units:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = int(zarr.open_array(str(out / "units" / "complete"), mode="r")[:].sum())
    assert written < done.size, "the dump finished before the kill"
    r = subprocess.run(_dump_cmd(out, mnist1d_teacher, "--resume"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"  # the uninterrupted run, same settings as the CLI's
    run_dump(_config(ref, mnist1d_teacher, batch_size=16, threads_per_worker=0), workers=2)
    got, want = _arrays(out), _arrays(ref)
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    report = verify_store(out)
    assert report.ok, report.problems[:5]


def test_nan_teacher_fails_its_unit_and_records_nothing(ray_session, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    config = DumpConfig(teacher="nan_teacher:make", dataset=DATASET, out=str(tmp_path / "s"), k=3,
                        temperatures=(1.0,), batch_size=64)
    with pytest.raises(SoftlabelsError, match=r"^unit \d+ failed: teacher produced NaN/inf logits for 1 sample.*nothing was recorded for this unit.*rerun with --resume"):
        run_dump(config, workers=2)
    assert zarr.open_array(str(tmp_path / "s" / "units" / "complete"), mode="r")[:].sum() == 0
    assert open_store(tmp_path / "s", allow_incomplete=True).meta.status == "writing"


def test_predictor_runs_without_ray(tmp_path, mnist1d_teacher):
    """The predictor is a plain class: no Ray needed to compute a unit."""
    predictor = TeacherPredictor(_config(tmp_path / "unused", mnist1d_teacher), device=torch.device("cpu"))
    fields = predictor.predict_unit(0, 100)
    assert fields["topk_values"].shape == (100, 1, 5) and fields["labels"].shape == (100,)
    assert fields["features/penultimate"].shape[:2] == (100, 1)
    code = "import sys, softlabels.pipelines.predictor, softlabels.stores, softlabels.losses; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_torchvision_teacher_on_imagefolder_with_loader_workers(ray_session, tmp_path):
    """Real photos (scikit-learn's samples) cut into 32x32 crops, decoded by DataLoader workers,
    a torchvision resnet18 state_dict, the penultimate hook found automatically plus a named layer."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from dump_overhead import make_imagefolder

    make_imagefolder(tmp_path / "images", 96, classes=4)
    teacher = load_teacher("torchvision:resnet18", None, input_shape=(3, 32, 32), num_classes=4)
    torch.save(teacher.model.state_dict(), tmp_path / "r18.pt")
    spec = f"imagefolder:{tmp_path / 'images'}?size=32&crop=32"
    config = DumpConfig(teacher="torchvision:resnet18", weights=str(tmp_path / "r18.pt"), dataset=spec,
                        out=str(tmp_path / "s"), k=3, temperatures=(1.0, 2.0), batch_size=32, loader_workers=2,
                        feature_layers=("penultimate", "layer3"), threads_per_worker=1)
    run_dump(config, workers=1)
    store = open_store(tmp_path / "s")
    assert store.schema.features == (("penultimate", 512), ("layer3", 256))
    assert store.meta.teacher["classifier_name"] == "fc"
    dataset, info = load_dataset(spec, "train")
    x = torch.stack([dataset[i][0] for i in range(info.num_samples)])
    with torch.inference_mode(), FeatureRecorder(teacher.model, {"layer3": "layer3"}) as rec:
        logits = teacher.model.eval()(x)
        layer3 = rec.features["layer3"]
    ref = summarize_logits(logits, 3, (1.0, 2.0), torch.as_tensor(info.labels))
    np.testing.assert_array_equal(store.array("topk_indices")[:, 0], ref["topk_indices"].numpy())
    np.testing.assert_allclose(store.array("features/layer3")[:, 0], layer3.numpy(), atol=2e-3, rtol=2e-3)
    assert np.array_equal(store.array("labels")[...], info.labels)
