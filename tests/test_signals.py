"""Issue 18: Ctrl-C and SIGTERM during a dump end with one line, exit 130 / 143, a resumable
store, and no Ray process of the run left behind. The teacher is gated (tests/slow_teacher.py)
so the signal always arrives while units are in flight."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from softlabels.stores.reader import open_store
from softlabels.stores.writer import StoreWriter

TESTS = Path(__file__).parent


def _ray_processes_of(pid):
    """Processes of the Ray session the driver ``pid`` started (its session dir ends in _<pid>)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"_{pid}/" in cmd or f"_{pid} " in cmd.replace("\0", " "):
                found.append(int(entry))
    return found


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_dump_in_one_line_leaving_it_resumable(tmp_path, sig, code):
    store, gate = tmp_path / "x.zarr", tmp_path / "gate"
    gate.write_text("hold")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "SLOW_TEACHER_GATE": str(gate), "SLOW_TEACHER_FREE_BATCHES": "4", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "softlabels.cli.app", "dump", "--teacher", "slow_teacher:make", "--dataset",
           "mnist1d:num_samples=3000", "--out", str(store), "--k", "3", "--temperatures", "1", "--batch-size", "64",
           "--workers", "1", "--no-features", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS)
    try:
        deadline = time.time() + 240
        while not (store / "units" / "complete" / "c" / "0").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == "interrupted; resume with --resume", err
    assert "Traceback" not in err and "SIGABRT" not in err and "*** " not in err
    deadline = time.time() + 10
    while _ray_processes_of(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _ray_processes_of(proc.pid) == []
    assert open_store(store, allow_incomplete=True).meta.status == "writing"
    recorded = zarr.open_array(str(store / "units" / "complete"), mode="r")[:]
    assert recorded[0] == 1
    assert StoreWriter(store).pending_units() == [int(u) for u in np.flatnonzero(recorded == 0)]
