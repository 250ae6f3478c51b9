"""Issue 18: stores are untrusted input. Damaged, crafted and forged stores are refused by
`train` in one line and named by `verify` (breaks 1, 3 and 4 of the issue, and a sweep of
random damage over every per-sample array)."""

import json
import os
import random
import shutil

import numpy as np
import pytest

from untrusted_helpers import PER_SAMPLE, copy_tree, digits_store, edit_unit, reseal, root_meta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return digits_store(tmp_path_factory.mktemp("untrusted") / "s.zarr")


def _train(cli, store, out, *extra):
    return cli("train", "--store", store, "--dataset", "digits", "--method", "kd-topk", "--epochs", "1",
               "--batch-size", "256", "--quiet", "--out", out, *extra)


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- break 1: a missing chunk trains as zeros ---------------------------------------------------
def test_missing_chunks_refuse_training_and_name_the_array(pristine, tmp_path, cli):
    store = copy_tree(pristine, tmp_path / "m.zarr")
    for name in ("topk_values", "topk_indices", "logsumexp"):
        os.remove(store / name / "c" / "3" / "0" / "0")
    line = _one_line_error(*_train(cli, store, tmp_path / "r")[::2])
    assert "topk_values/c/3/0/0" in line and "missing" in line and "rows 768..1023" in line
    assert f"softlabels verify {store}" in line
    assert not (tmp_path / "r" / "student.pt").exists()
    code, _, err = cli("verify", store)
    assert code == 1 and "bad: chunk logsumexp/c/3/0/0: missing (unit 3, rows 768..1023)" in err


def test_the_reader_refuses_a_missing_chunk_instead_of_the_fill_value(pristine, tmp_path):
    from softlabels.errors import SoftlabelsError
    from softlabels.stores.reader import open_store

    store = copy_tree(pristine, tmp_path / "m.zarr")
    os.remove(store / "topk_values" / "c" / "2" / "0" / "0")
    with pytest.raises(SoftlabelsError, match=r"topk_values/c/2/0/0 .*missing \(rows 512\.\.767\)"):
        open_store(store).gather("topk_values", [600])


# -- break 3: impossible values -----------------------------------------------------------------
def _indices_out_of_range(a):
    a["topk_indices"][:5, 0, 0] = 10


def _duplicate_indices(a):
    a["topk_indices"][:7, 0, 1] = a["topk_indices"][:7, 0, 0]


def _nan_values(a):
    a["topk_values"][:9] = np.nan


def _inf_normaliser(a):
    a["logsumexp"][:4, 0, 1] = np.inf


def _positive_logprob(a):
    a["topk_values"][:6, 0, :] = 0.5
    a["logsumexp"][:6, 0, :] = 2.0  # the normaliser agrees, so only "log-probability > 0" is wrong


CRAFTED = {
    "indices out of range": (_indices_out_of_range, "topk_indices: 5 row(s) with a class index outside 0..9"),
    "duplicate indices": (_duplicate_indices, "topk_indices: 7 row(s) with a class repeated within the top-k"),
    "NaN values": (_nan_values, "topk_values: 9 row(s) with NaN/inf values"),
    "inf normaliser": (_inf_normaliser, "logsumexp: 4 row(s) with NaN/inf normalisers"),
    "log-probability > 0": (_positive_logprob, "topk_values: 6 row(s) with log-probabilities > 0"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_impossible_values_are_refused_by_train_and_named_by_verify(pristine, tmp_path, cli, case):
    edit, named = CRAFTED[case]
    store = copy_tree(pristine, tmp_path / "c.zarr")
    edit_unit(store, 2, edit)
    line = _one_line_error(*_train(cli, store, tmp_path / "r")[::2])
    assert named in line and "first in unit 2, rows 512..767" in line, line
    assert not (tmp_path / "r" / "student.pt").exists()
    code, _, err = cli("verify", store)
    assert code == 1 and f"bad: targets {named} (first in unit 2, rows 512..767)" in err, err


def test_label_logit_above_its_normaliser_is_named(pristine, tmp_path):
    from softlabels.stores.verify import verify_store

    store = copy_tree(pristine, tmp_path / "c.zarr")

    def edit(a):
        a["label_logit"][:3, 0] = -0.01
        a["logsumexp"][:3, 0, 0] = -1.0  # T=1: the label's probability would be exp(0.99) > 1

    edit_unit(store, 1, edit)
    assert any("label_logit: 3 row(s) above the row's normaliser" in p for p in verify_store(store).problems)


def test_a_resealed_but_sane_store_still_trains(pristine, tmp_path, cli):
    store = copy_tree(pristine, tmp_path / "ok.zarr")
    reseal(store)
    code, out, err = _train(cli, store, tmp_path / "r")
    assert code == 0, err
    assert (tmp_path / "r" / "student.pt").exists()


# -- break 4: forged provenance -----------------------------------------------------------------
def test_arrays_swapped_between_stores_fail_verify_and_the_pinned_digest(tmp_path, cli):
    a = digits_store(tmp_path / "a.zarr", seed=1, teacher="test:teacher-a")
    b = digits_store(tmp_path / "b.zarr", seed=2, teacher="test:teacher-b")
    pinned = root_meta(a).get("store_digest")
    for entry in b.iterdir():  # every array and units/*, keeping A's root zarr.json
        if entry.is_dir():
            shutil.rmtree(a / entry.name)
            shutil.copytree(entry, a / entry.name)
    code, _, err = cli("verify", a)
    assert code == 1, err
    assert "store digest: the content's digest is" in err
    code, out, _ = cli("info", a, "--json")
    assert code == 0 and json.loads(out)["teacher"]["spec"] == "test:teacher-a"
    code, _, err = cli("train", "--store", a, "--dataset", "digits", "--method", "kd-topk", "--epochs", "1",
                       "--quiet", "--out", tmp_path / "r", "--expect-digest", pinned)
    line = _one_line_error(code, err)
    assert f"not the expected {pinned}" in line


def test_info_prints_the_digest_and_train_copy_verify_accept_it(pristine, tmp_path, cli):
    digest = root_meta(pristine)["store_digest"]
    code, out, _ = cli("info", pristine)
    assert code == 0 and digest in out
    code, out, _ = cli("info", pristine, "--json")
    assert json.loads(out)["store_digest"] == digest
    assert cli("verify", pristine, "--expect-digest", digest)[0] == 0
    other = "sha256:" + "0" * 64
    code, _, err = cli("verify", pristine, "--expect-digest", other)
    assert code == 1 and f"not the expected {other}" in err
    code, _, err = cli("copy", pristine, tmp_path / "c.zarr", "--quiet", "--expect-digest", other)
    assert code == 1 and f"not the expected {other}" in err and not (tmp_path / "c.zarr").exists()
    assert cli("copy", pristine, tmp_path / "c.zarr", "--quiet", "--expect-digest", digest)[0] == 0
    code, _, err = cli("verify", pristine, "--expect-digest", "md5:abc")
    assert code == 2 and err.strip() == "error: --expect-digest must look like sha256:<64 hex digits> (as " \
        "`softlabels info` prints it), got 'md5:abc'"


def test_verify_flags_objects_the_format_does_not_define(pristine, tmp_path):
    from softlabels.stores.verify import verify_store

    store = copy_tree(pristine, tmp_path / "x.zarr")
    (store / "topk_values" / "c" / "notes.txt").write_text("hello")
    (store / "extra").mkdir()
    (store / "extra" / "zarr.json").write_text("{}")
    problems = verify_store(store).problems
    assert "object topk_values/c/notes.txt: not defined by the format for this schema" in problems
    assert any(p.startswith("metadata extra/zarr.json") for p in problems)


# -- the sweep: random single-chunk damage over every per-sample array ---------------------------
def test_sweep_of_random_chunk_damage_is_named_by_verify_and_refused_by_train(pristine, tmp_path, cli):
    rng = random.Random(18)
    units = 6
    cases = [(kind, name) for kind in ("delete", "truncate", "flip") for name in PER_SAMPLE]
    cases += [(rng.choice(["delete", "truncate", "flip"]), rng.choice(PER_SAMPLE)) for _ in range(36 - len(cases))]
    seen = set()
    for i, (kind, name) in enumerate(cases):
        store = copy_tree(pristine, tmp_path / f"d{i}.zarr")
        chunk = store / name / "c" / str(rng.randrange(units))
        chunk = chunk / "0" if name != "labels" else chunk
        chunk = chunk / "0" if name not in ("labels", "label_logit") else chunk
        data = chunk.read_bytes()
        if kind == "delete":
            chunk.unlink()
        elif kind == "truncate":
            chunk.write_bytes(data[: rng.randrange(len(data))])
        else:
            pos = rng.randrange(len(data))
            chunk.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :])
        key = str(chunk.relative_to(store))
        code, _, err = cli("verify", store)
        assert code == 1 and f"bad: chunk {key}:" in err, (kind, key, err)
        code, _, err = _train(cli, store, tmp_path / f"r{i}")
        line = _one_line_error(code, err)
        assert name in line and "softlabels verify" in line, (kind, key, line)
        seen.add((kind, name))
        shutil.rmtree(store)
    assert len(cases) >= 30 and len(seen) == 18
