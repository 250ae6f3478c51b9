"""Progress that moves (issue 19): the dump reports rows per batch, not per unit, with a rate and
an ETA; outside a terminal it prints plain lines; it ends with a summary of what it made."""

import io
import re

from softlabels.progress import Progress, format_seconds


def test_plain_lines_outside_a_terminal():
    stream = io.StringIO()  # not a TTY
    with Progress("dump", total=400, unit="rows", interval=0.0, stream=stream) as p:
        p.start()
        p.update(100, units="0/4")
        p.update(250, units="2/4")
        p.update(200)  # never goes back
        p.update(400, units="4/4")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("dump: 100/400 rows (25.0 %), ") and "rows/s, ETA " in lines[0] and lines[0].endswith("units 0/4")
    assert lines[1].startswith("dump: 250/400 rows (62.5 %)")
    assert lines[-1].startswith("dump: 400/400 rows (100.0 %)") and lines[-1].endswith("units 4/4")
    assert len(lines) == 4  # one per update (interval 0), the final line not repeated


def test_quiet_and_interval():
    stream = io.StringIO()
    with Progress("train", total=3, unit="epochs", interval=3600, stream=stream) as p:
        for epoch in (1, 2, 3):
            p.update(epoch, loss="0.5")
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]  # only the final line
    stream = io.StringIO()
    with Progress("train", total=3, enabled=False, interval=0, stream=stream) as p:
        p.update(3)
    assert stream.getvalue() == ""
    assert format_seconds(59) == "59 s" and format_seconds(61) == "1 min 01 s" and format_seconds(3700) == "1 h 01 min"


def test_dump_progress_moves_within_a_unit_and_ends_with_a_summary(cli, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTLABELS_PROGRESS_SECONDS", "0")
    code, out, err = cli("dump", "--teacher", "slow_teacher:make", "--dataset", "mnist1d:num_samples=300",
                         "--batch-size", "40", "--out", tmp_path / "s.zarr", "--workers", "1")
    assert code == 0, err
    done = [int(m.group(1).replace(",", "")) for m in re.finditer(r"^dump: ([\d,]+)/240 rows", err, re.M)]
    assert done[-1] == 240 and done == sorted(done)
    assert any(0 < d < 240 for d in done), err  # one unit of 240 rows: progress came from its batches
    assert re.search(r"^dump: \d+/240 rows \([\d.]+ %\), [\d,]+ rows/s, ETA \d+ s, units 0/1$", err, re.M), err
    assert re.search(r"^wrote .*s\.zarr: 240 rows in 1 units \(1 this run\) in [\d.]+ s .* rows/s, [\d.]+ B/sample$", err, re.M)
    assert re.search(r"^teacher top-1 accuracy on train: 0\.\d{4}; label in the stored top-k: 1\.0000$", err, re.M)
    assert re.search(r"^top-k mass \(mean / min\): T=1 1\.0000 / 1\.0000, T=2 1\.0000", err, re.M)  # k = C = 10: exactly 1


def test_train_prints_plain_epoch_lines_outside_a_terminal(cli, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("SOFTLABELS_PROGRESS_SECONDS", "0")
    code, out, err = cli("train", "--dataset", "digits", "--method", "ce", "--epochs", "3", "--out", tmp_path / "run")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert lines[0].startswith("train: 1/3 epochs (33.3 %), ") and "epochs/s, ETA " in lines[0]
    assert re.search(r", loss \d\.\d{4}, test acc \d+\.\d\d%$", lines[0]), lines[0]
    assert lines[-1].startswith("train: 3/3 epochs (100.0 %)")
