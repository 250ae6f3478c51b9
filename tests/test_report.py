"""`softlabels report`: the HTML report of a dumped store, of two stores compared and of a set of
student runs. Each figure must be there and decode as a PNG of a sensible size; the numbers behind
the figures must equal an independent numpy computation from the raw Zarr arrays."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import zarr
from assertions import one_line_error
from PIL import Image

from softlabels.pipelines.dump import run_dump
from softlabels.pipelines.predictor import DumpConfig
from softlabels.report import build_report
from softlabels.stores.from_logits import write_store_from_logits

DATASET = "mnist1d:num_samples=1500"  # 1,200 train rows
K, TEMPS = 5, (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def dumped(ray_session, tmp_path_factory, mnist1d_teacher):
    out = tmp_path_factory.mktemp("report") / "mnist1d-train.zarr"
    run_dump(DumpConfig(teacher="builtin:cnn", weights=str(mnist1d_teacher), dataset=DATASET, out=str(out), k=K,
                        temperatures=TEMPS, batch_size=128, threads_per_worker=1), workers=1)
    return out


def _raw(path):
    """The stored arrays, read with zarr alone (not softlabels' reader), as float64 / int64."""
    get = lambda name: zarr.open_array(str(path / name), mode="r")[...]  # noqa: E731
    out = {"values": get("topk_values").astype(np.float64), "indices": get("topk_indices").astype(np.int64),
           "lse": get("logsumexp").astype(np.float64)}
    if (path / "labels").exists():
        out["labels"] = get("labels").astype(np.int64)
    return out


def _dense(raw, t, num_classes, views=slice(None)):
    """The KD-topk distribution at t, ``[N*V, C]``, in numpy: exact top-k, uniform tail."""
    values, indices = raw["values"][:, views], raw["indices"][:, views]
    j = TEMPS.index(t)
    p = np.exp(values / t - raw["lse"][:, views, j : j + 1]).reshape(-1, values.shape[-1])
    idx = indices.reshape(-1, values.shape[-1])
    fill = np.clip(1.0 - p.sum(-1), 0, None) / (num_classes - idx.shape[1])
    dense = np.repeat(fill[:, None], num_classes, axis=1)
    np.put_along_axis(dense, idx, p, axis=1)
    return dense


def _figures(html):
    """{figure key: PIL image} of every embedded figure."""
    found = re.findall(r'<figure id="fig-([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    return {key: Image.open(io.BytesIO(base64.b64decode(data), )) for key, data in found}


def _check_pngs(figs, keys):
    assert set(keys) <= set(figs), sorted(figs)
    for key in keys:
        img = figs[key]
        assert img.format == "PNG"
        img.load()  # decodes the whole image
        w, h = img.size
        assert 350 <= w <= 1100 and 250 <= h <= 800, (key, img.size)
        assert np.asarray(img.convert("L")).std() > 5, key  # not a blank canvas


def test_report_of_a_dumped_store(dumped, tmp_path, cli):
    out = tmp_path / "r.html"
    code, stdout, err = cli("report", dumped, "--out", out)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    html = out.read_text()
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    figs = _figures(html)
    _check_pngs(figs, [f"store1-{k}" for k in ("confidence", "topk-mass", "reliability", "label-in-topk", "per-class",
                                                 "similarity")])
    assert "verify</td><td>ok (" in html and "mnist1d" in html

    # the numbers behind the figures, against numpy on the raw arrays
    report = build_report([str(dumped)], verify=False)
    st = report.stats[0]
    raw, c = _raw(dumped), st.num_classes
    y = raw["labels"]
    conf = np.exp(raw["values"][:, 0, 0])  # T = 1: the stored values are the log-probabilities
    correct = raw["indices"][:, 0, 0] == y
    bins = np.clip(np.floor(conf * 15).astype(int), 0, 14)
    ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(y)
    assert st.ece == pytest.approx(ece, abs=1e-9)
    assert f"ECE = {100 * ece:.2f} %" in report.markdown() or f"{100 * ece:.2f} %" in report.markdown()
    for j, t in enumerate(TEMPS):
        mass = np.exp(raw["values"][:, 0] / t - raw["lse"][:, 0, j : j + 1]).sum(-1)
        assert st.mass_mean(t) == pytest.approx(mass.mean(), abs=1e-6)
        assert st.mass_min[t] == pytest.approx(mass.min(), abs=1e-6)
        x, cdf = st.mass_cdf(t)
        for q in (0.25, 0.5, 0.9):  # the plotted CDF at a bin edge = the fraction of rows at most there
            edge = x[np.searchsorted(x, np.quantile(mass, q))]
            assert cdf[np.searchsorted(x, edge)] == pytest.approx((np.minimum(mass, 1 - 1e-12) < edge).mean(), abs=2e-3)
    ranks = [(raw["indices"][:, 0, :j] == y[:, None]).any(-1).mean() for j in range(1, K + 1)]
    np.testing.assert_allclose(st.label_in_topk(), ranks, atol=1e-12)
    np.testing.assert_allclose(st.per_class_accuracy(), [correct[y == i].mean() for i in range(c)], atol=1e-12)
    t = st.similarity_temperature
    assert t == 4.0  # the stored T closest to 4
    dense = _dense(raw, t, c)
    expected = np.stack([dense[y == i].mean(0) for i in range(c)])
    np.testing.assert_allclose(st.similarity(), expected, atol=1e-6)
    np.testing.assert_allclose(st.similarity().sum(1), 1.0, atol=1e-5)


def _pair(tmp_path, labels, **second):
    g = np.random.default_rng(3)
    n, c = len(labels), 60
    base = g.normal(0, 2.0, (n, c)).astype(np.float32)
    base[np.arange(n), labels] += 5.0
    ds = {"spec": "test:pair", "split": "train"}
    common = dict(temperatures=TEMPS, labels=labels, rows_per_shard=256, rows_per_chunk=128)
    a = tmp_path / "a.zarr"
    write_store_from_logits(a, base, k=K, dataset=ds, teacher={"spec": "test:a"}, **common)
    b = tmp_path / "b.zarr"
    other = base + g.normal(0, 1.5, base.shape).astype(np.float32)
    write_store_from_logits(b, other, k=3, dataset=second.pop("dataset", ds), teacher={"spec": "test:b"},
                            **{**common, "rows_per_shard": 512, "rows_per_chunk": 256, **second})
    return a, b, c


def test_two_stores_compared(tmp_path, cli):
    labels = np.random.default_rng(0).integers(0, 60, 2000)
    a, b, c = _pair(tmp_path, labels)
    code, _, err = cli("report", a, b, "--out", tmp_path / "r.html", "--no-verify", "-T", "2")
    assert code == 0, err
    figs = _figures((tmp_path / "r.html").read_text())
    _check_pngs(figs, ["store1-similarity", "store2-similarity", "diff-1-2"])

    report = build_report([str(a), str(b)], temperature=2.0, verify=False)
    (ag,) = report.agreements
    ra, rb = _raw(a), _raw(b)
    assert ag.top1_agreement == pytest.approx((ra["indices"][:, 0, 0] == rb["indices"][:, 0, 0]).mean(), abs=1e-12)
    pa, pb = _dense(ra, 2.0, c), _dense(rb, 2.0, c)
    assert ag.kl_ab == pytest.approx((pa * np.log(pa / pb)).sum(-1).mean(), rel=1e-4)
    assert ag.kl_ba == pytest.approx((pb * np.log(pb / pa)).sum(-1).mean(), rel=1e-4)
    sim = [np.stack([p[labels == i].mean(0) for i in range(c)]) for p in (pa, pb)]
    np.testing.assert_allclose(report.stats[1].similarity() - report.stats[0].similarity(), sim[1] - sim[0], atol=1e-6)
    # 60 classes: the map shows the 50 most confused, and says so
    assert "the 50 most confused of 60 classes" in (tmp_path / "r.html").read_text()

    code, out, err = cli("report", a, b, "--format", "md", "--no-verify", "-T", "2")
    assert code == 0, err
    assert f"| a.zarr | b.zarr | all | 2,000 | {100 * ag.top1_agreement:.2f} % | {ag.kl_ab:.5f} |" in out


def test_stores_over_different_datasets_are_refused(tmp_path, cli):
    labels = np.random.default_rng(0).integers(0, 60, 600)
    a, b, _ = _pair(tmp_path, labels, dataset={"spec": "test:other", "split": "train"})
    one_line_error(*cli("report", a, b, "--out", tmp_path / "r.html"), "different datasets",
                   "dataset: 'test:pair' vs 'test:other'")
    assert not (tmp_path / "r.html").exists()


def test_incomplete_store_is_refused(dumped, tmp_path, cli):
    broken = tmp_path / "half.zarr"
    shutil.copytree(dumped, broken)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["softlabels"]["status"] = "writing"
    (broken / "zarr.json").write_text(json.dumps(meta))
    one_line_error(*cli("report", broken, "--out", tmp_path / "r.html"), "is incomplete", "--resume")


def test_runs_directory_without_metrics(tmp_path, cli):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    one_line_error(*cli("report", "--runs", tmp_path / "empty", "--out", tmp_path / "r.html"), "has no metrics.json")
    one_line_error(*cli("report", "--out", tmp_path / "r.html"), "nothing to report")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    """Two recipes x two seeds of real (tiny) training on mnist1d; one run as an older metrics.json
    without a per-epoch history."""
    from softlabels.train import train_student

    root = tmp_path_factory.mktemp("runs")
    for method, options in (("ce", {}), ("ls", {"hparams": {"epsilon": 0.2}})):
        for seed in (0, 1):
            train_student(None, "mnist1d:num_samples=600", "builtin:mlp", method, epochs=4, seed=seed, progress=False,
                          out_dir=root / f"{method}-{seed}", **options)
    old = root / "ls-1" / "metrics.json"
    metrics = json.loads(old.read_text())
    del metrics["history"]
    old.write_text(json.dumps(metrics))
    return root


def test_report_of_runs(runs, tmp_path, cli):
    out = tmp_path / "r.html"
    code, _, err = cli("report", "--runs", runs, "--out", out)
    assert code == 0, err
    _check_pngs(_figures(out.read_text()), ["runs-curves"])

    report = build_report([], [str(runs)])
    groups = {g.label: g for g in report.groups}
    assert sorted(groups) == ["ce", "ls"]
    for method, group in groups.items():
        accs = [json.loads((runs / f"{method}-{s}" / "metrics.json").read_text())["test_accuracy"] for s in (0, 1)]
        assert group.mean == pytest.approx(np.mean(accs)) and group.std == pytest.approx(np.std(accs, ddof=1))
        assert sorted(group.seeds) == [0, 1]
    curves = groups["ce"].curves()
    assert curves.shape == (2, 4)
    history = json.loads((runs / "ce-0" / "metrics.json").read_text())["history"]
    np.testing.assert_allclose(curves[0], [h["test_accuracy"] for h in history])
    assert groups["ls"].curves().shape == (1, 4)  # the run without a history adds its final accuracy only

    code, md, err = cli("report", "--runs", runs, "--format", "md")
    assert code == 0, err
    g = groups["ce"]
    assert f"| ce | 2 | {100 * g.mean:.2f} ± {100 * g.std:.2f} |" in md


def test_view_spread_of_a_multi_view_store(tmp_path, monkeypatch):
    g = np.random.default_rng(5)
    n, v, c = 1000, 3, 12
    labels = g.integers(0, c, n)
    logits = g.normal(0, 2.0, (n, 1, c)) + g.normal(0, 1.0, (n, v, c))  # the views of one sample differ a little
    logits[np.arange(n), :, labels] += 3.0
    path = tmp_path / "mv.zarr"
    write_store_from_logits(path, logits.astype(np.float32), k=4, temperatures=TEMPS, labels=labels,
                            dataset={"spec": "test:views", "split": "train"}, rows_per_shard=256, rows_per_chunk=128)
    report = build_report([str(path)], verify=False)
    st = report.stats[0]
    raw = _raw(path)
    dense = _dense(raw, 4.0, c).reshape(n, v, c)
    mean = dense.mean(1, keepdims=True)
    kl = (dense * np.log(dense / mean)).sum(-1).mean(-1)
    assert st.view_kl_mean == pytest.approx(kl.mean(), rel=1e-4) and st.view_kl_rows == n
    assert st.view_kl_counts.sum() == n
    tops = raw["indices"][:, :, 0]
    assert st.view_top1_agree == (tops == tops[:, :1]).all(-1).sum()
    _check_pngs(_figures(report.html()), ["store1-view-spread"])

    monkeypatch.setattr("softlabels.report.stats.VIEW_SPREAD_ELEMENTS", n * v * c // 3)  # every 3rd block
    monkeypatch.setattr("softlabels.report.stats.BLOCK_ROWS", 128)
    sampled = build_report([str(path)], verify=False)
    st = sampled.stats[0]
    assert st.view_kl_rows == 128 * 3  # blocks 0, 3, 6 of 8
    assert "Measured on 384 of 1,000 samples" in sampled.html()


def test_temperature_not_stored_is_refused(tmp_path, cli):
    labels = np.random.default_rng(0).integers(0, 60, 300)
    a, _, _ = _pair(tmp_path, labels)
    one_line_error(*cli("report", a, "-T", "3", "--out", tmp_path / "r.html"), "-T 3 is not stored", "1, 2, 4")


def test_damaged_store_is_one_line(tmp_path, cli):
    labels = np.random.default_rng(0).integers(0, 60, 600)
    a, _, _ = _pair(tmp_path, labels)
    chunk = sorted(p for p in (a / "topk_values" / "c").rglob("*") if p.is_file())[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    chunk.write_bytes(data)
    one_line_error(*cli("report", a, "--out", tmp_path / "r.html"), "is damaged", "checksum mismatch",
                   "softlabels verify")
