"""Figures `info` shows (issue 19): per-layer feature statistics, and a top-k mass of exactly 1
when every class is stored."""

import json

import numpy as np

from softlabels.stores import open_store
from softlabels.stores.from_logits import write_store_from_logits


def test_info_shows_feature_statistics(cli, small_store):
    store = open_store(small_store)
    feats = store.array("features/penultimate")[...].astype(np.float64)
    stats = store.meta.summary["features"]["penultimate"]
    assert abs(stats["mean"] - feats.mean()) < 1e-9 and abs(stats["rms"] - np.sqrt(np.square(feats).mean())) < 1e-9
    code, out, err = cli("info", small_store, "--json")
    assert code == 0 and json.loads(out)["summary"]["features"]["penultimate"] == stats
    code, out, err = cli("info", small_store)
    assert code == 0
    assert f"mean {stats['mean']:,.4g}, RMS {stats['rms']:,.4g}" in out
    assert "float16 clamped" in out and "topk_values 0, label_logit 0" in out


def test_topk_mass_is_exactly_one_when_k_equals_c(tmp_path):
    g = np.random.default_rng(0)
    logits = (g.normal(0, 6, (500, 7)) * np.array([1, 1, 1, 1, 1, 1, 9])).astype(np.float32)  # a wide tail
    write_store_from_logits(tmp_path / "s", logits, k=7, temperatures=(1, 4), labels=g.integers(0, 7, 500),
                            teacher={"spec": "t"}, dataset={"spec": "d", "split": "train"})
    mass = open_store(tmp_path / "s").meta.summary["topk_mass"]
    assert mass == {"1": {"mean": 1.0, "min": 1.0}, "4": {"mean": 1.0, "min": 1.0}}
