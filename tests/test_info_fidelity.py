"""Fidelity figures recorded at dump time and shown by `softlabels info` (table and --json) equal
the numbers recomputed independently, with numpy, from the raw arrays and the teacher's logits."""

import json

import numpy as np
import pytest
import zarr

from softlabels.stores.from_logits import write_store_from_logits

N, V, C, K, TEMPS = 700, 3, 9, 3, (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def teacher_logits():
    g = np.random.default_rng(7)
    labels = g.integers(0, C, N)
    logits = g.normal(0, 2.0, (N, V, C)).astype(np.float32)
    logits[np.arange(N), :, labels] += np.array([3.0, 1.0, 0.0])  # views differ in how sure the teacher is
    return logits, labels


def _write(path, logits, labels):
    write_store_from_logits(path, logits, k=K, temperatures=TEMPS, labels=labels, teacher={"spec": "test:logits"},
                            dataset={"spec": "test:fidelity", "split": "train"}, rows_per_shard=256,
                            rows_per_chunk=128)
    return path


def _from_raw_arrays(path, views):
    """The fidelity figures from the stored arrays alone (zarr + numpy, not softlabels' reader)."""
    raw = {name: zarr.open_array(str(path / name), mode="r")[...] for name in ("topk_values", "topk_indices",
                                                                               "logsumexp")}
    values = raw["topk_values"][:, views].astype(np.float64)
    lse = raw["logsumexp"][:, views].astype(np.float64)
    out = {"topk_mass": {}}
    for j, t in enumerate(TEMPS):
        mass = np.exp(values / t - lse[..., j : j + 1]).sum(-1)
        out["topk_mass"][f"{t:g}"] = {"mean": mass.mean(), "min": mass.min()}
    if (path / "labels").exists():
        labels = zarr.open_array(str(path / "labels"), mode="r")[...]
        hit = raw["topk_indices"][:, views] == labels[:, None, None]
        out["teacher_top1_accuracy"] = hit[..., 0].mean()
        out["label_in_topk"] = hit.any(-1).mean()
    return out


def _assert_figures(shown, expected):
    for t, mass in expected["topk_mass"].items():
        assert shown["topk_mass"][t]["mean"] == pytest.approx(mass["mean"], rel=1e-12)
        assert shown["topk_mass"][t]["min"] == pytest.approx(mass["min"], rel=1e-12)
    for key in ("teacher_top1_accuracy", "label_in_topk"):
        if key in expected:
            assert shown[key] == pytest.approx(expected[key], rel=1e-12)


def test_info_shows_fidelity_of_a_multi_view_store(tmp_path, cli, teacher_logits):
    logits, labels = teacher_logits
    store = _write(tmp_path / "mv.zarr", logits, labels)
    code, out, err = cli("info", store, "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["rows"] == N and summary["views"] == V
    _assert_figures(summary, _from_raw_arrays(store, slice(None)))
    _assert_figures(summary["view0"], _from_raw_arrays(store, slice(0, 1)))

    # ... and they mean what they claim about the teacher's own logits:
    order = np.argsort(-logits, axis=-1, kind="stable")
    assert summary["teacher_top1_accuracy"] == pytest.approx((order[..., 0] == labels[:, None]).mean())
    assert summary["label_in_topk"] == pytest.approx((order[..., :K] == labels[:, None, None]).any(-1).mean())
    assert summary["view0"]["teacher_top1_accuracy"] == pytest.approx((order[:, 0, 0] == labels).mean())
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, axis=-1)[..., -K:].sum(-1)
    assert summary["topk_mass"]["1"]["mean"] == pytest.approx(top.mean(), abs=1e-3)
    assert summary["topk_mass"]["1"]["min"] == pytest.approx(top.min(), abs=1e-3)
    assert summary["view0"]["teacher_top1_accuracy"] > summary["teacher_top1_accuracy"]  # view 0 is the surest

    code, out, _ = cli("info", store)
    assert code == 0
    lines = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    mass = summary["topk_mass"]["4"]
    assert f"top-k mass T=4 mean {mass['mean']:.4f}, min {mass['min']:.4f}" in lines
    mass0 = summary["view0"]["topk_mass"]["2"]
    assert f"top-k mass T=2 (view 0) mean {mass0['mean']:.4f}, min {mass0['min']:.4f}" in lines
    assert f"teacher top-1 accuracy {summary['teacher_top1_accuracy']:.4f}" in lines
    assert f"label in top-{K} {summary['label_in_topk']:.4f}" in lines
    assert f"label in top-{K} (view 0) {summary['view0']['label_in_topk']:.4f}" in lines


def test_info_of_an_unlabelled_store_says_na(tmp_path, cli, teacher_logits):
    logits, _ = teacher_logits
    store = _write(tmp_path / "transfer.zarr", logits[:, 0], None)
    code, out, err = cli("info", store, "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["teacher_top1_accuracy"] is None and summary["label_in_topk"] is None
    assert "view0" not in summary
    _assert_figures(summary, _from_raw_arrays(store, slice(None)))
    code, out, _ = cli("info", store)
    lines = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert "teacher top-1 accuracy n/a (unlabelled)" in lines
    assert f"label in top-{K} n/a (unlabelled)" in lines
