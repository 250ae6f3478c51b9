"""Issue 18: the one-line errors owed instead of crashes, hangs and tracebacks."""

import json
import os
import shutil

import pytest

from softlabels.errors import SoftlabelsError, SpecError
from softlabels.stores import format as fmt
from softlabels.stores.writer import StoreWriter


def _schema(n=1000):
    return fmt.StoreSchema(num_samples=n, num_classes=10, k=3, temperatures=(1.0,), labeled=False)


def test_overwrite_onto_a_symlinked_out_is_one_line_and_keeps_the_target(tmp_path):
    StoreWriter.create(tmp_path / "real.zarr", _schema())
    os.symlink(tmp_path / "real.zarr", tmp_path / "link.zarr")
    with pytest.raises(SoftlabelsError, match="refusing to remove .*link.zarr: it is a symbolic link"):
        StoreWriter.create(tmp_path / "link.zarr", _schema(), overwrite=True)
    assert (tmp_path / "real.zarr" / "zarr.json").exists()


def test_info_on_a_store_being_created_is_not_a_keyerror(tmp_path, cli):
    StoreWriter.create(tmp_path / "s.zarr", _schema())
    shutil.rmtree(tmp_path / "s.zarr" / "units")  # as seen while the arrays are still being created
    code, out, err = cli("info", tmp_path / "s.zarr", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["status"] == "writing" and data["units_complete"] == 0 and data["store_digest"] is None


@pytest.mark.parametrize("count, value", [("num_samples", 10**15), ("views", 10**6), ("num_classes", 2**40)])
def test_counts_in_metadata_are_bounded_before_anything_is_allocated(tmp_path, cli, count, value):
    StoreWriter.create(tmp_path / "s.zarr", _schema())
    doc = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    doc["attributes"]["softlabels"]["schema"][count] = value
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(doc))
    for command in ("info", "verify"):
        code, _, err = cli(command, tmp_path / "s.zarr")
        assert code != 0 and "exceeds this format's bound" in err and "Traceback" not in err, err


def test_metadata_of_the_wrong_type_is_one_line(tmp_path, cli):
    from untrusted_helpers import digits_store

    store = digits_store(tmp_path / "s.zarr")
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["softlabels"]["summary"] = "abc"
    (store / "zarr.json").write_text(json.dumps(doc))
    for args in (["info", store], ["train", "--store", store, "--dataset", "digits", "--method", "kd-topk",
                                    "--epochs", "1", "--quiet", "--out", tmp_path / "r"]):
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "'summary' has the wrong type" in err, err


def test_dataset_parameters_are_bounded():
    from softlabels.datasets import load_dataset

    with pytest.raises(SpecError, match=r"mnist1d: num_samples=100000000000 is above its bound of 2,000,000"):
        load_dataset("mnist1d:num_samples=100000000000", "train")
    with pytest.raises(SpecError, match="synthetic: dim=100000 is above its bound of 4,096"):
        load_dataset("synthetic:dim=100000", "train")


@pytest.mark.parametrize("spec, message", [
    ("builtins:exit", "teacher factory builtins:exit() tried to exit the program"),
    ("builtins:dict", "builtins:dict() returned dict, not a torch.nn.Module"),
])
def test_a_teacher_factory_that_exits_or_returns_no_module_is_an_error(spec, message):
    from softlabels.teachers import build_teacher_model

    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_teacher_model(spec, (40,), 10)


def test_feature_names_dot_and_dotdot_are_refused():
    for name in (".", "..", "a/b"):
        with pytest.raises(SoftlabelsError, match="names are plain"):
            fmt.StoreSchema(num_samples=10, num_classes=10, k=3, temperatures=(1.0,), features=((name, 4),))


def test_an_http_server_error_is_not_reported_as_missing(cli):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(500, "boom")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
        code, _, err = cli("info", url)
    finally:
        server.shutdown()
        server.server_close()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {url}: the server answered HTTP 500"), err
    assert "404" not in err and "no store" not in err
