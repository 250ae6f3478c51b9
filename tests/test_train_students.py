"""Real students on real photos, through the CLI: torchvision resnet18 and mobilenet_v3_small
trained for one epoch from a torchvision:resnet18 teacher's store (kd, kd-topk, hint), with the
random-resized-crop training view, val-split evaluation, loader workers and hint layers."""

import json
import os
import sys

import pytest
import torch

from softlabels.pipelines.dump import run_dump
from softlabels.pipelines.predictor import DumpConfig
from softlabels.teachers import load_teacher

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from photo_folder import make_photo_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo_store(ray_session, tmp_path_factory):
    """16 train + 8 val real-photo crops in 4 classes, 16x16 inputs; a resnet18 teacher store."""
    root = tmp_path_factory.mktemp("photos")
    make_photo_folder(root / "images", train=16, val=8, size=20)
    spec = f"imagefolder:{root / 'images'}?size=16&crop=16"
    teacher = load_teacher("torchvision:resnet18", None, input_shape=(3, 16, 16), num_classes=4)
    torch.save(teacher.model.state_dict(), root / "r18.pt")
    config = DumpConfig(teacher="torchvision:resnet18", weights=str(root / "r18.pt"), dataset=spec,
                        out=str(root / "t.zarr"), k=4, temperatures=(1.0, 4.0), batch_size=16, loader_workers=0,
                        feature_layers=("penultimate",), threads_per_worker=1)
    run_dump(config, workers=1)
    return {"spec": spec, "store": root / "t.zarr"}


def _train(cli, photo_store, out, *args):
    return cli("train", "--store", photo_store["store"], "--dataset", photo_store["spec"], "--epochs", "1",
               "--batch-size", "8", "--quiet", "--out", out, *args)


@pytest.mark.parametrize("student", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["kd", "kd-topk", "hint"])
def test_cli_trains_torchvision_students_from_a_resnet18_store(cli, photo_store, tmp_path, student, method):
    extra = {("torchvision:resnet18", "kd"): ["--workers", "2"],
             ("torchvision:resnet18", "kd-topk"): ["--channels-last", "--grad-clip", "1", "--amp",
                                                   "--warmup-epochs", "0.5", "--schedule", "step"]}
    extra = extra.get((student, method), [])
    code, out, err = _train(cli, photo_store, tmp_path / "run", "--student", student, "--method", method,
                            "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "5e-4", *extra)
    assert code == 0, err
    assert ("--amp has no effect on the CPU; training in float32" in err) == ("--amp" in extra)
    assert f"{method}: val accuracy" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"] == student and metrics["eval_split"] == "val" and metrics["epochs"] == 1
    assert metrics["train_samples"] == 16 and metrics["steps"] == 2
    recipe = metrics["recipe"]
    assert recipe["optimizer"] == "sgd" and recipe["weight_decay"] == 5e-4 and recipe["amp"] == "off"
    assert recipe["train_transform"] == "random-resized-crop+flip"
    assert recipe["workers"] == (2 if "--workers" in extra else 0)
    if "--channels-last" in extra:
        assert recipe["channels_last"] and recipe["grad_clip"] == 1.0 and recipe["schedule"] == "step"
        assert recipe["warmup_epochs"] == 0.5 and metrics["history"][0]["lr"] == pytest.approx(0.05)
    (record,) = metrics["history"]
    assert record["images_per_second"] > 0 and 0 <= record["test_accuracy"] <= 1
    expected = {"kd": {"ce", "kd"}, "kd-topk": {"ce", "kd"}, "hint": {"ce", "hint"}}[method]
    assert set(record["components"]) == expected
    if method == "hint":
        assert recipe["student_feature_layer"] == "penultimate"
    import torchvision

    model = torchvision.models.get_model(student.split(":")[1], weights=None, num_classes=4)
    model.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert json.loads(checkpoint["json"])["epoch"] == 1


def test_hint_on_a_named_student_layer_and_its_errors(cli, photo_store, tmp_path, monkeypatch):
    code, _, err = _train(cli, photo_store, tmp_path / "a", "--student", "torchvision:resnet18", "--method", "hint",
                          "--student-feature-layer", "layer3", "--no-aug")
    assert code == 0, err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["recipe"]["student_feature_layer"] == "layer3"
    assert metrics["recipe"]["train_transform"] == "eval preprocessing"
    regressor = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["loss"]["regressor.proj.weight"]
    assert regressor.shape == (512, 256)  # layer3 (256 channels, pooled) -> the teacher's 512-d penultimate

    code, _, err = _train(cli, photo_store, tmp_path / "b", "--student", "torchvision:resnet18", "--method", "hint",
                          "--student-feature-layer", "layer5")
    assert code != 0 and err.startswith("error: the student has no module 'layer5' (did you mean layer4, layer3, layer2?)")
    assert "top-level modules: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc" in err

    (tmp_path / "mine.py").write_text(
        "import torchvision\n"
        "def wide(num_classes):\n"
        "    return torchvision.models.resnet18(num_classes=num_classes + 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = _train(cli, photo_store, tmp_path / "c", "--student", "mine:wide", "--method", "kd")
    assert code != 0 and err == (
        "error: student mine:wide outputs 5 classes but the store has 4; build it with num_classes=4 "
        "(specs get it automatically)\n"
    )
    code, _, err = _train(cli, photo_store, tmp_path / "d", "--student", "torchvision:resnet181", "--method", "kd")
    assert code != 0 and err.startswith("error: torchvision has no model 'resnet181' (did you mean resnet18")
    code, _, err = _train(cli, photo_store, tmp_path / "e", "--student", "torchvision:resnet18", "--method", "kd",
                          "--batch-size", "32")
    assert code != 0 and err == (
        "error: --batch-size 32 is larger than the 16 training samples; use --batch-size <= 16\n"
    )


def test_docs_training_example_runs(photo_store, tmp_path, monkeypatch, capsys):
    """The 'your own training loop' example of docs/TRAINING.md, as printed, on the photo store."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "TRAINING.md").read_text()
    section = text[text.index("## Your own training loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) < 50
    (tmp_path / "photos").symlink_to(Path(photo_store["store"]).parent / "images")
    (tmp_path / "teacher.zarr").symlink_to(photo_store["store"])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/TRAINING.md", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["epoch 1", "epoch 2"]
    assert "val accuracy" in printed[-1]
    import torchvision

    torchvision.models.resnet18(num_classes=4).load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
