"""The CLI starts without torch or Ray: ``--help``, ``--version``, ``info``, ``verify`` and
``list`` need neither (issue 19). The test is on the import graph, never on the time."""

import json
import subprocess
import sys

import pytest

PROBE = """
import sys
sys.argv = ["softlabels", *{args!r}]
from softlabels.cli.app import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "ray", "torchvision") if m in sys.modules)
sys.stderr.write("HEAVY=" + ",".join(heavy) + " CODE=" + str(code) + "\\n")
"""


def imported_heavy(*args):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))], capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    heavy, code = line[len("HEAVY="):].split(" CODE=")
    return [m for m in heavy.split(",") if m], code, proc.stdout


def test_importing_the_app_imports_neither_torch_nor_ray():
    code = "import sys, softlabels.cli.app; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["dump", "--help"], ["train", "--help"], ["teacher", "fit", "--help"], ["list", "--help"],
])
def test_help_and_version_import_neither_torch_nor_ray(args):
    heavy, code, out = imported_heavy(*args)
    assert code in ("0", "None"), out
    assert heavy == []
    assert out


def test_info_and_verify_import_neither_torch_nor_ray(small_store):
    heavy, code, out = imported_heavy("info", str(small_store), "--json")
    assert heavy == [] and code in ("0", "None")
    assert json.loads(out)["num_samples"] == 3000
    heavy, code, out = imported_heavy("verify", str(small_store))
    assert heavy == [] and code in ("0", "None")
    assert out.startswith("ok:")
