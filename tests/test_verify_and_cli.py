"""`softlabels verify` names every damaged chunk; `info` reports the store; errors are one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from softlabels.stores import format as fmt
from softlabels.stores.verify import verify_store

CLI = [sys.executable, "-m", "softlabels.cli.app"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def _shard(store, name, unit):
    return store / name / "c" / str(unit) / "0" / "0" if name != "labels" else store / name / "c" / str(unit)


def test_clean_store_verifies(small_store):
    report = verify_store(small_store)
    assert report.ok, report.problems
    assert report.units_checked == 12
    r = run("verify", small_store)
    assert r.returncode == 0 and "ok:" in r.stdout and "12 units verified" in r.stdout


def test_flipped_byte_is_named(small_store):
    shard = _shard(small_store, "topk_values", 3)
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_store(small_store)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("chunk topk_values/c/3/0/0: checksum mismatch")
    r = run("verify", small_store)
    assert r.returncode == 1
    assert "bad: chunk topk_values/c/3/0/0: checksum mismatch" in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("1 problem(s) found")
    assert "Traceback" not in r.stderr


def test_truncated_and_missing_chunks_are_named(small_store):
    shard = _shard(small_store, "logsumexp", 5)
    shard.write_bytes(shard.read_bytes()[:-7])
    os.remove(_shard(small_store, "labels", 7))
    problems = verify_store(small_store).problems
    assert any(p.startswith("chunk logsumexp/c/5/0/0:") for p in problems), problems
    assert any(p.startswith("chunk labels/c/7: missing (unit 7, rows 1792..2047)") for p in problems), problems
    assert len(problems) == 2


def test_unrecorded_unit_in_a_complete_store_is_named(small_store):
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):  # store the 0, do not delete the chunk
        arr = zarr.open_array(str(small_store / "units" / "complete"), mode="r+")
        arr[4] = 0
    assert (small_store / "units" / "complete" / "c" / "4").exists()
    problems = verify_store(small_store).problems
    assert problems == ["status is 'complete' but 1 unit(s) are not recorded complete: 4"]


def test_info_json_and_table(small_store):
    r = run("info", small_store, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("num_samples", "num_classes", "k", "temperatures", "views", "status", "bytes_on_disk"):
        assert key in info
    assert (info["num_samples"], info["num_classes"], info["k"], info["views"]) == (3000, 12, 4, 1)
    assert info["temperatures"] == [1.0, 2.0, 4.0] and info["status"] == "complete"
    du = sum(f.stat().st_size for f in small_store.rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == du
    assert info["teacher"]["spec"] == "test:logits"
    r = run("info", small_store)
    assert r.returncode == 0 and "complete" in r.stdout and "3,000 x 1" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "/no/such/store"], "error: store /no/such/store does not exist"),
        (["verify", "/no/such/store"], "error: store /no/such/store does not exist"),
        (["info", "{tmp}"], "is not a softlabels store"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    r = run(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_newer_format_is_refused_by_cli(small_store):
    doc = json.loads((small_store / "zarr.json").read_text())
    doc["attributes"]["softlabels"]["format_version"] = "2.1"
    (small_store / "zarr.json").write_text(json.dumps(doc))
    r = run("info", small_store)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: {small_store} uses softlabels store format 2.1, newer than this reader's {fmt.FORMAT_VERSION}; "
        "upgrade softlabels (pip install -U softlabels)"
    )


def test_all_zero_units_are_stored_not_skipped(tmp_path):
    """zarr omits fill-value chunks by default; a unit of all-zero labels must still verify."""
    from softlabels.stores.from_logits import write_store_from_logits

    logits = np.random.default_rng(0).normal(size=(512, 5)).astype(np.float32)
    labels = np.zeros(512, dtype=np.int64)
    write_store_from_logits(tmp_path / "z", logits, k=2, temperatures=(1,), labels=labels,
                            classifier_weight=np.ones((5, 3)), classifier_bias=np.zeros(5),
                            rows_per_shard=256, rows_per_chunk=256)
    assert verify_store(tmp_path / "z").ok
    assert (tmp_path / "z" / "labels" / "c" / "1").exists()
