"""docs/LOSSES.md's "Adding a method" example, run as written: the toy method registers through
the public API, is refused nowhere, and trains one epoch from a store with ``train_student``."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from softlabels.data import store_dataset_metadata
from softlabels.datasets import load_dataset
from softlabels.losses import build_method, list_methods
from softlabels.losses.registry import _REGISTRY
from softlabels.models import build_model
from softlabels.stores.from_logits import write_store_from_logits

DOC = Path(__file__).resolve().parents[1] / "docs" / "LOSSES.md"


def _example() -> str:
    text = DOC.read_text()
    section = text[text.index("## Adding a method") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _digits_store(path):
    """A store of a random-init MLP teacher over digits' train split (a teacher, not a good one)."""
    train, info = load_dataset("digits", "train")
    torch.manual_seed(0)
    with torch.no_grad():
        logits = build_model("mlp", info.input_shape, 10)(train.inputs).numpy()
    write_store_from_logits(
        path, logits, k=10, temperatures=(1.0, 4.0), labels=info.labels,
        teacher={"spec": "builtin:mlp", "checkpoint_sha256": "0" * 64, "num_classes": 10},
        dataset=store_dataset_metadata(info),
    )
    return path


def test_adding_a_method_example_trains_one_epoch(tmp_path, one_torch_thread):
    from softlabels.train import train_student

    store = _digits_store(tmp_path / "digits.zarr")

    namespace: dict = {}
    try:
        exec(compile(_example(), str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
        assert "kd-sharp" in list_methods()
        method = build_method("kd-sharp", num_classes=10)
        assert method.reads_store and method.prepared_prefix is not None  # inherits the declarations
        metrics = train_student(
            store, "digits", "builtin:mlp", "kd-sharp", epochs=1,
            out_dir=tmp_path / "run", progress=False, warn=lambda message: None,
        )
    finally:
        _REGISTRY._entries.pop("kd-sharp", None)  # keep the registry as the other tests expect it
    assert metrics["method"] == "kd-sharp" and len(metrics["history"]) == 1
    assert metrics["history"][0]["loss"] > 0 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "student.pt").exists()
    # the target really is the sharpened one: sharper than kd's on the same stored rows
    store_targets = {
        "topk_values": torch.tensor([[0.0, -1.0, -2.0] + [-9.0] * 7]),
        "topk_indices": torch.arange(10).unsqueeze(0),
        "logsumexp": torch.tensor([0.0]),
    }
    kd = build_method("kd", num_classes=10, temperature=4.0)
    sharp = namespace["SharpKD"](num_classes=10, temperature=4.0)
    assert sharp.teacher_distribution(None, store_targets, 10).max() > kd.teacher_distribution(None, store_targets, 10).max()
