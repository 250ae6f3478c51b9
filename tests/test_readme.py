"""The README's tour runs, command by command, exactly as written except for size: mnist1d is
made small and every training runs 1 epoch (issue 19: every example command in the README runs in
a test or in `make demo`). The "Sharing stores" commands (s3://, https://) run against real local
servers in tests/test_remote.py (test_ray_dump_to_s3_then_train_from_s3_and_http,
test_copy_round_trip_local_s3_s3_local_is_byte_identical, test_http_store_reads_verifies_and_copies).
Also: the README, `softlabels list` and --help name the same built-ins."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = "mnist1d:num_samples=500,transfer_samples=500"


def tour_commands() -> list[list[str]]:
    text = README.read_text()
    block = text.split("## Tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        words = shlex.split(pending, comments=True)
        pending = ""
        if words:
            assert words[0] == "softlabels", words
            commands.append(words[1:])
    return commands


def _small(args: list[str]) -> list[str]:
    args = [SMALL if a == "mnist1d" else a for a in args]
    if args[:2] == ["teacher", "fit"] or args[0] == "train":
        if "--epochs" in args:
            args[args.index("--epochs") + 1] = "1"
        else:
            args += ["--epochs", "1"]
    return args


def test_the_tour_runs(cli, ray_session, tmp_path, monkeypatch):
    commands = tour_commands()
    assert len(commands) >= 12 and ["list", "methods"] in commands
    monkeypatch.chdir(tmp_path)
    for args in commands:
        code, out, err = cli(*_small(args))
        assert code == 0, f"softlabels {' '.join(args)}: {err}"
    assert (tmp_path / "runs" / "kd-views" / "metrics.json").exists()


def _names(pattern: str, text: str) -> set[str]:
    return set(re.findall(pattern, text))


def test_readme_list_and_help_agree(cli):
    from softlabels.augment import POLICIES, STUDENT_AUGMENTS
    from softlabels.datasets import list_datasets
    from softlabels.losses import list_methods
    from softlabels.models import list_models

    text = README.read_text()
    methods_line = next(line for line in text.splitlines() if line.startswith("- methods:"))
    assert _names(r"`([\w+-]+)`", methods_line) == set(list_methods())
    teachers_line = text.split("\n- teachers:", 1)[1].split("\n- ", 1)[0]  # the whole bullet
    named = {n for group in re.findall(r"`builtin:([\w|<>-]+)`", teachers_line) for n in group.split("|")}
    assert all(m in named or (m.startswith("tangmlp-") and "tangmlp-<W>" in named) for m in list_models()), named
    for name in list_datasets():
        assert f"`{name}" in text, name
    for name in [*POLICIES, *STUDENT_AUGMENTS]:
        assert name in text, name
    listed = {}
    for kind in ("datasets", "teachers", "students", "methods", "augmentations"):
        code, out, err = cli("list", kind)
        assert code == 0, err
        listed[kind] = out
    for name in list_methods():
        assert re.search(rf"^│ {re.escape(name)} ", listed["methods"], re.M), name
    for name in list_models():
        assert f"builtin:{name}" in listed["students"] and f"builtin:{name}" in listed["teachers"]
    for name in list_datasets():
        assert f"│ {name}" in listed["datasets"], name
    assert "size=256, crop=224" in listed["datasets"]
    for name in [*POLICIES, *STUDENT_AUGMENTS]:
        assert f" {name} " in listed["augmentations"], name
    code, out, err = cli("dump", "--help")
    for panel in ("Data", "Teacher", "Targets", "Workers", "Output"):
        assert re.search(rf"╭─ {panel} ─", out), panel
    assert "<bool>" not in out and "softlabels list datasets" in out
    assert "imagefolder:/data/photos?size=256&crop=224" in out
    code, out, err = cli("train", "--help")
    assert "<bool>" not in out


@pytest.mark.parametrize("args", [["list", "nothing"]])
def test_list_errors_are_one_line(cli, args):
    from assertions import one_line_error

    one_line_error(*cli(*args), "cannot list 'nothing'", "datasets, teachers, students, methods, augmentations")
