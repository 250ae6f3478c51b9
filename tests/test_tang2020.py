"""benchmarks/tang2020.py (Tang et al. 2020's synthetic table, from stores) and the CIFAR-100
plan benchmarks/tang2020_cifar100.py: their smoke modes run the real dump + train path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import tang2020  # noqa: E402
import tang2020_cifar100  # noqa: E402

METHODS = {"ce", "ls", "kd", "kd-pt", "kd-sim", "kd-pt+sim", "kd-topk"}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("runs/**/metrics.json"))]


def test_quick_trains_every_method_from_the_store_and_beats_chance(tmp_path):
    results = tang2020.main(["--quick", "--out", str(tmp_path)])
    (setting,) = results["settings"]
    store = setting["store"]
    assert set(setting["runs"]) == {"ce", "ls", "kd", "kd-pt", "kd-sim", "kd-pt+sim", "kd-topk k=1", "kd-topk k=3",
                                    "kd-topk k=5"}
    chance = 1 / 20  # beaten by more than 4 binomial stds of a chance-level score on the 2,000 test samples
    for label, runs in setting["runs"].items():
        assert len(runs) == 1 and runs[0]["test_accuracy"] > chance + 4 * (chance * (1 - chance) / 2000) ** 0.5, label
    metrics = _metrics(tmp_path)
    assert {m["method"] for m in metrics} == METHODS and len(metrics) == 9
    for m in metrics:  # every teacher-based method read the dumped store, nothing else
        assert m["store_path"] == (None if m["method"] in ("ce", "ls") else store), m["method"]
        assert m["student"] == "builtin:tangmlp-16"
    assert sorted(m["k"] for m in metrics if m["method"] == "kd-topk") == [1, 3, 5]
    assert 0 < setting["teacher"]["test_accuracy"] < 1 and setting["teacher"]["mean_p_true_T1"] > 1 / 20
    text = (tmp_path / "results.md").read_text()
    assert "| kd-pt |" in text and "57.05" in text  # the paper's number beside ours
    assert (tmp_path / "commands.txt").read_text().count("softlabels train") == 9
    # a rerun with the same --out reuses every run; other settings are refused
    again = tang2020.main(["--quick", "--out", str(tmp_path)])
    assert again["settings"][0]["runs"] == setting["runs"]
    with pytest.raises(SystemExit, match="other settings"):
        tang2020.main(["--quick", "--lr", "0.01", "--out", str(tmp_path)])


def test_effect_sizes_and_verdicts():
    diff, d = tang2020.effect([2.0, 4.0], [0.0, 2.0])
    assert diff == pytest.approx(2.0) and d == pytest.approx(2.0 / 2 ** 0.5)
    assert tang2020._verdict(1.2, at_least=1) == "holds"
    assert tang2020._verdict(-1.0, at_least=1) == "does not hold"
    assert tang2020._verdict(0.3, at_least=1).startswith("not resolved")


def test_cifar100_script_help():
    r = subprocess.run([sys.executable, str(BENCH / "tang2020_cifar100.py"), "--help"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="100"))
    assert r.returncode == 0 and "--teacher-weights" in r.stdout and "resnet56 -> resnet20" in r.stdout
    r = subprocess.run([sys.executable, str(BENCH / "tang2020_cifar100.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "give --root" in r.stderr


def test_cifar100_smoke_on_fake_cifar_shaped_images(tmp_path):
    summary = tang2020_cifar100.main(["--smoke", "--out", str(tmp_path)])
    assert set(summary["runs"]) == {"ce", "ls", "kd", "kd-pt", "kd-sim", "kd-pt+sim", "kd-topk k=1", "kd-topk k=3",
                                    "kd-topk k=5"}
    metrics = _metrics(tmp_path)
    assert {m["method"] for m in metrics} == METHODS and len(metrics) == 9
    for m in metrics:
        assert m["student"] == "builtin:resnet20" and m["epochs"] == 1 and m["history"][0]["loss"] > 0
        assert m["recipe"]["train_transform"] != "eval preprocessing" and m["train_samples"] == 60
    assert "softlabels dump --teacher builtin:resnet56" in (tmp_path / "commands.txt").read_text()
    assert 0 <= summary["teacher_test_accuracy"] <= 1
