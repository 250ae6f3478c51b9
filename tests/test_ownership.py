"""Issue 18, break 2: `--overwrite` racing a running dump must not mix two teachers in one store.

Every dump records a run id; workers and the driver check it before each write, record and
finalize. The CLI race is made deterministic by a gated teacher (tests/slow_teacher.py): dump A
writes two units, then waits; dump B replaces the store with --overwrite and finishes; then A
is released and must stop, in one line, without touching B's store."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from softlabels.errors import IncompleteStoreError, SoftlabelsError
from softlabels.stores import format as fmt
from softlabels.stores.verify import verify_store
from softlabels.stores.writer import StoreWriter

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _schema(n=1024):
    return fmt.StoreSchema(num_samples=n, num_classes=10, k=3, temperatures=(1.0,), labeled=False,
                           rows_per_shard=256, rows_per_chunk=256)


def _fields(schema, unit, seed):
    start, stop = schema.unit_range(unit)
    g = np.random.default_rng(seed * 100 + unit)
    values = np.sort(-np.abs(g.normal(size=(stop - start, 1, 3))), axis=-1)[..., ::-1].astype(np.float32)
    indices = np.stack([g.permutation(10)[:3] for _ in range(stop - start)])[:, None, :]
    return {"topk_values": values, "topk_indices": indices, "logsumexp": np.zeros((stop - start, 1, 1))}


def test_a_replaced_writer_stops_before_writing_recording_or_finalizing(tmp_path):
    from softlabels.stores.ownership import OwnershipLostError

    schema = _schema()
    a = StoreWriter.create(tmp_path / "x.zarr", schema)
    a.mark_complete(0, a.write_unit(0, _fields(schema, 0, 1)))
    b = StoreWriter.create(tmp_path / "x.zarr", schema, overwrite=True)
    assert b.meta["generation"] == a.meta["generation"] + 1 and b.run_id != a.run_id
    with pytest.raises(OwnershipLostError, match=r"stopped before writing unit 1: run \w+ \(generation 2\) owns it now"):
        a.write_unit(1, _fields(schema, 1, 1))
    with pytest.raises(OwnershipLostError, match="stopped before recording unit 1"):
        a.mark_complete(1, {"topk_values": "00" * 32, "topk_indices": "00" * 32, "logsumexp": "00" * 32})
    for u in range(schema.num_units):
        b.mark_complete(u, b.write_unit(u, _fields(schema, u, 2)))
    b.finalize()
    with pytest.raises(OwnershipLostError, match="stopped before finalizing"):
        a.finalize()
    assert verify_store(tmp_path / "x.zarr").ok


def test_a_resume_takes_over_and_the_old_writer_stops(tmp_path):
    from softlabels.stores.ownership import OwnershipLostError

    schema = _schema()
    a = StoreWriter.create(tmp_path / "x.zarr", schema)
    a.mark_complete(0, a.write_unit(0, _fields(schema, 0, 1)))
    r = StoreWriter.create(tmp_path / "x.zarr", schema, resume=True)
    assert r.pending_units() == [1, 2, 3] and r.meta["generation"] == a.meta["generation"]
    with pytest.raises(OwnershipLostError):
        a.write_unit(1, _fields(schema, 1, 1))
    for u in r.pending_units():
        r.mark_complete(u, r.write_unit(u, _fields(schema, u, 1)))
    r.finalize()
    assert verify_store(tmp_path / "x.zarr").ok


def test_finalize_catches_a_unit_changed_after_it_was_recorded(tmp_path):
    schema = _schema()
    b = StoreWriter.create(tmp_path / "x.zarr", schema)
    for u in range(schema.num_units):
        b.mark_complete(u, b.write_unit(u, _fields(schema, u, 2)))
    # a late write from a replaced run that passed its check just before the replacement
    late = StoreWriter(tmp_path / "x.zarr")
    late.write_unit(2, _fields(schema, 2, 1))
    with pytest.raises(IncompleteStoreError, match=r"1 recorded unit\(s\) changed after they were recorded \(first: unit 2\).*--resume"):
        b.finalize()
    r = StoreWriter.create(tmp_path / "x.zarr", schema, resume=True)
    assert r.pending_units() == [2]
    r.mark_complete(2, r.write_unit(2, _fields(schema, 2, 2)))
    r.finalize()
    assert verify_store(tmp_path / "x.zarr").ok


def _dump(out, teacher, *extra, env=None):
    cmd = [sys.executable, "-m", "softlabels.cli.app", "dump", "--teacher", teacher, "--dataset",
           "mnist1d:num_samples=3000", "--out", str(out), "--k", "3", "--temperatures", "1,4", "--batch-size", "64",
           "--workers", "1", "--no-features", "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS)


def _recorded(store):
    path = store / "units" / "complete" / "c"
    if not path.exists():
        return 0
    try:
        return int(zarr.open_array(str(store / "units" / "complete"), mode="r")[:].sum())
    except Exception:  # noqa: BLE001 - being written
        return 0


def test_overwrite_racing_a_running_dump_stops_the_old_dump(tmp_path):
    store = tmp_path / "x.zarr"
    gate = tmp_path / "gate"
    gate.write_text("hold")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SLOW_TEACHER_GATE": str(gate), "SLOW_TEACHER_FREE_BATCHES": "8", "RAY_USAGE_STATS_ENABLED": "0"}
    a = _dump(store, "slow_teacher:make", env=env)
    try:
        deadline = time.time() + 240
        while _recorded(store) < 2:  # A wrote and recorded units 0 and 1, then its teacher waits at the gate
            assert a.poll() is None, a.communicate()
            assert time.time() < deadline, "dump A never recorded two units"
            time.sleep(0.2)
        b = _dump(store, "slow_teacher:other", "--overwrite", env=env)
        _, b_err = b.communicate(timeout=300)
        assert b.returncode == 0, b_err
        gate.unlink()  # release A: it must notice that the store is no longer its own
        _, a_err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    errors = [line for line in a_err.splitlines() if line.startswith("error:")]
    assert a.returncode == 1, a_err
    assert len(errors) == 1 and "this dump (run" in errors[0] and "owns it now" in errors[0], a_err
    assert "Traceback" not in a_err
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["softlabels"]
    assert meta["status"] == "complete" and meta["schema"]["teacher"]["spec"] == "slow_teacher:other"
    report = verify_store(store)
    assert report.ok, report.problems
    # every unit holds B's targets: B's teacher recomputed here gives the same top-1 classes
    from softlabels.datasets import load_dataset
    from slow_teacher import other
    import torch

    data, _ = load_dataset("mnist1d:num_samples=3000", "train")
    with torch.no_grad():
        top1 = other(10)(data.inputs).argmax(-1).numpy()
    stored = zarr.open_array(str(store / "topk_indices"), mode="r")[:, 0, 0]
    assert (stored == top1).all()


def test_two_fresh_dumps_to_one_out_stay_refused(tmp_path):
    StoreWriter.create(tmp_path / "x.zarr", _schema())
    with pytest.raises(SoftlabelsError, match="already exists; pass --resume"):
        StoreWriter.create(tmp_path / "x.zarr", _schema())
