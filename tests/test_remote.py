"""Remote stores against real local servers: moto's S3 server and Python's static HTTP server.

A Ray dump writes straight to S3, students train from s3:// and http:// URLs, `softlabels copy`
moves stores byte for byte and verifies them, and every remote failure is one line.
"""

import functools
import json
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from softlabels.stores import open_store
from softlabels.stores.format import StoreSchema
from softlabels.stores.keys import object_keys
from softlabels.stores.location import location_exists, remove_location, store_keys

KEY, SECRET = "testing", "testing"


@pytest.fixture(scope="session")
def s3():
    """moto's standalone S3 server on 127.0.0.1 with one bucket; credentials are passed
    explicitly (never via os.environ, which Ray workers would inherit)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    client.create_bucket(Bucket="team")
    options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
    flags = [f"--storage-option=endpoint_url={endpoint}", f"--storage-option=key={KEY}", f"--storage-option=secret={SECRET}"]
    yield {"endpoint": endpoint, "options": options, "flags": flags, "client": client}
    server.stop()


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """A directory served by the stdlib static file server (no Range support, no listing of stores)."""
    root = tmp_path_factory.mktemp("www")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def list_directory(self, path):  # like S3 website hosting or nginx without autoindex
            self.send_error(404, "directory listing disabled")
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tiny_store(tmp_path):
    """A complete store small enough for a slow local S3 server: 3 units of 256 rows (20 chunks)."""
    from softlabels.stores.from_logits import write_store_from_logits

    g = np.random.default_rng(0)
    n, c = 768, 12
    labels = g.integers(0, c, n)
    logits = g.normal(0, 2.0, (n, c)).astype(np.float32)
    logits[np.arange(n), labels] += 4.0
    path = tmp_path / "s.zarr"
    write_store_from_logits(
        path, logits, k=4, temperatures=(1, 2, 4), labels=labels,
        features={"penultimate": g.normal(size=(n, 8)).astype(np.float32)},
        classifier_weight=g.normal(size=(c, 8)), classifier_bias=np.zeros(c),
        teacher={"spec": "test:logits"}, dataset={"spec": "test:small", "split": "train"},
        rows_per_shard=256, rows_per_chunk=128,
    )
    return path


def _url(name):
    return f"s3://team/{uuid.uuid4().hex[:8]}/{name}"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_object_keys_from_the_schema_are_exactly_the_stored_objects(tiny_store):
    store = open_store(tiny_store)
    listed = store_keys(zarr.storage.LocalStore(tiny_store, read_only=True))
    derived = object_keys(StoreSchema.from_dict(store.meta.raw["schema"]))
    assert sorted(derived) == listed and len(listed) == len(set(derived))
    assert derived[0] == "zarr.json" and "labels/c/2" in derived and "units/sha256/c/2/0/0" in derived


def test_copy_round_trip_local_s3_s3_local_is_byte_identical(tiny_store, s3, cli, tmp_path):
    first, second = _url("a.zarr"), _url("b.zarr")
    code, _, err = cli("copy", tiny_store, first, *s3["flags"])
    assert code == 0, err
    assert "copied" in err and "verified 20 chunks and 3 units" in err
    code, _, err = cli("copy", first, second, *s3["flags"], "--quiet")
    assert code == 0 and err == ""
    code, _, err = cli("copy", second, tmp_path / "back.zarr", *s3["flags"], "--quiet")
    assert code == 0, err
    assert _files(tmp_path / "back.zarr") == _files(tiny_store)

    code, out, _ = cli("verify", second, *s3["flags"])
    assert code == 0 and "3 units verified" in out
    code, out, _ = cli("info", second, "--json", *s3["flags"])
    info = json.loads(out)
    assert code == 0 and info["status"] == "complete" and info["num_samples"] == 768
    assert info["bytes_on_disk"] == sum(len(b) for b in _files(tiny_store).values())

    # local -> local, and an existing destination is refused unless --overwrite
    code, _, _ = cli("copy", tiny_store, tmp_path / "local.zarr", "--quiet")
    assert code == 0 and _files(tmp_path / "local.zarr") == _files(tiny_store)
    code, _, err = cli("copy", tiny_store, second, *s3["flags"])
    assert code == 2 and err.strip() == f"error: {second} already exists; pass --overwrite to replace it"
    (tmp_path / "local.zarr" / "zarr.json").unlink()  # as an interrupted copy leaves it
    code, _, err = cli("copy", second, tmp_path / "local.zarr", *s3["flags"], "--overwrite", "--quiet")
    assert code == 0 and _files(tmp_path / "local.zarr") == _files(tiny_store), err


def test_s3_exists_and_remove(s3):
    url, options = _url("x.zarr"), s3["options"]
    assert not location_exists(url, options)
    s3["client"].put_object(Bucket="team", Key=url.split("team/")[1] + "/partial/c/0", Body=b"x")
    assert location_exists(url, options)  # anything at all, e.g. an interrupted copy
    remove_location(url, options)
    assert not location_exists(url, options)


def test_interrupted_s3_store_is_refused_then_resumed_and_replaced(s3, cli, tmp_path):
    from softlabels.errors import IncompleteStoreError, StoreExistsError
    from softlabels.stores.verify import verify_store
    from softlabels.stores.writer import StoreWriter
    from softlabels.targets import summarize_logits

    url, options = _url("r.zarr"), s3["options"]
    g = np.random.default_rng(0)
    n, c = 768, 10
    logits = torch.as_tensor(g.normal(0, 2, (n, 1, c)), dtype=torch.float32)
    labels = g.integers(0, c, n)
    schema = StoreSchema(num_samples=n, num_classes=c, k=3, temperatures=(1.0, 2.0), rows_per_shard=256,
                         rows_per_chunk=128, dataset={"spec": "test", "split": "train"})

    def write(writer, unit):
        start, stop = schema.unit_range(unit)
        lab = torch.as_tensor(labels[start:stop]).unsqueeze(1)
        fields = {k: t.numpy() for k, t in summarize_logits(logits[start:stop], 3, (1.0, 2.0), lab).items()}
        writer.mark_complete(unit, writer.write_unit(unit, {**fields, "labels": labels[start:stop]}))

    write(StoreWriter.create(url, schema, storage_options=options), 0)  # then the driver "crashes"
    with pytest.raises(IncompleteStoreError, match="--resume"):
        open_store(url, storage_options=options)
    code, _, err = cli("copy", url, tmp_path / "c.zarr", *s3["flags"])
    assert code == 2 and "is not complete (status 'writing')" in err
    with pytest.raises(StoreExistsError, match="pass --resume to continue it"):
        StoreWriter.create(url, schema, storage_options=options)
    writer = StoreWriter.create(url, schema, resume=True, storage_options=options)
    assert writer.pending_units() == [1, 2]
    for unit in writer.pending_units():
        write(writer, unit)
    writer.finalize()
    report = verify_store(url, storage_options=options)
    assert report.ok and report.units_checked == 3
    np.testing.assert_array_equal(open_store(url, storage_options=options).array("labels")[...], labels)
    assert StoreWriter.create(url, schema, overwrite=True, storage_options=options).pending_units() == [0, 1, 2]


def test_copy_refuses_an_incomplete_store(tiny_store, cli, tmp_path):
    group = zarr.open_group(str(tiny_store), mode="r+")
    meta = dict(group.attrs["softlabels"])
    meta["status"] = "writing"
    group.attrs["softlabels"] = meta
    code, _, err = cli("copy", tiny_store, tmp_path / "c.zarr")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not complete (status 'writing'); finish it with `softlabels dump ... --resume`" in err
    assert not (tmp_path / "c.zarr").exists()


def test_copy_of_a_damaged_store_fails_verification_and_is_not_a_store(tiny_store, s3, cli):
    shard = tiny_store / "topk_values" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x01
    shard.write_bytes(bytes(data))
    url = _url("bad.zarr")
    code, _, err = cli("copy", tiny_store, url, *s3["flags"], "--quiet")
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("bad: chunk topk_values/c/1/0/0: checksum mismatch")
    assert lines[-1].startswith(f"error: the copy of {tiny_store} failed verification (1 problem(s)")
    assert lines[-1].endswith(f"{url} was not changed; check the source with `softlabels verify {tiny_store}`")
    code, _, err = cli("info", url, *s3["flags"])
    assert code == 2 and err.startswith(f"error: no store at {url}")
    # the copy went to a staging prefix, removed on failure: nothing is left next to the destination
    assert not location_exists(url, s3["options"])
    listed = s3["client"].list_objects_v2(Bucket="team", Prefix=url.split("team/", 1)[1].rsplit("/", 1)[0])
    assert listed.get("KeyCount", 0) == 0


def test_http_store_reads_verifies_and_copies(tiny_store, http_root, cli, tmp_path):
    root, base = http_root
    name = uuid.uuid4().hex[:8]
    code, _, err = cli("copy", tiny_store, root / name / "s.zarr", "--quiet")
    assert code == 0, err
    url = f"{base}/{name}/s.zarr"
    code, out, err = cli("verify", url)
    assert code == 0 and "20 chunks and 3 units verified" in out, err
    code, out, _ = cli("info", url, "--json")
    assert code == 0 and json.loads(out)["bytes_on_disk"] == sum(len(b) for b in _files(tiny_store).values())
    local, remote = open_store(tiny_store), open_store(url)
    rows = np.random.default_rng(0).integers(0, 768, 300)  # chunk-wise byte-range reads
    for field, value in remote.read(rows).items():
        np.testing.assert_array_equal(value, local.read(rows)[field])
    code, _, err = cli("copy", url, tmp_path / "from-http.zarr", "--quiet")
    assert code == 0, err
    assert _files(tmp_path / "from-http.zarr") == _files(tiny_store)

    code, _, err = cli("info", f"{base}/{name}/missing.zarr")
    assert code == 2 and err.strip() == (
        f"error: no store at {base}/{name}/missing.zarr (HTTP 404 for {base}/{name}/missing.zarr/zarr.json); check the URL"
    )
    code, _, err = cli("copy", tiny_store, f"{base}/{name}/new.zarr")
    assert code == 2 and err.strip().endswith("http(s) stores are read-only; copy to s3:// or a local path")


def test_remote_failures_are_one_line(tiny_store, s3, cli, monkeypatch):
    fast = ['--storage-option=config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2}',
            f"--storage-option=key={KEY}", f"--storage-option=secret={SECRET}"]
    code, _, err = cli("info", "s3://team/x.zarr", "--storage-option=endpoint_url=http://127.0.0.1:9", *fast)
    assert code == 2 and err.strip() == (
        "error: cannot reach http://127.0.0.1:9 for s3://team/x.zarr; check the endpoint "
        "(--storage-option endpoint_url=... or AWS_ENDPOINT_URL) and the network"
    )
    code, _, err = cli("copy", tiny_store, "s3://no-such-bucket/x.zarr", *s3["flags"])
    assert code == 2 and err.strip() == (
        f"error: bucket 'no-such-bucket' does not exist at {s3['endpoint']}; create it or fix the URL "
        "s3://no-such-bucket/x.zarr"
    )
    code, _, err = cli("verify", "s3://team/nothing-here.zarr", *s3["flags"])
    assert code == 2 and err.strip() == "error: no store at s3://team/nothing-here.zarr (no zarr.json there); check the URL"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # skip_instance_cache: a fresh S3 client that sees this environment, as a new process would
    code, _, err = cli("info", "s3://team/x.zarr", f"--storage-option=endpoint_url={s3['endpoint']}",
                       "--storage-option=skip_instance_cache=true")
    assert code == 2 and err.startswith("error: no credentials for s3://team/x.zarr: set AWS_ACCESS_KEY_ID")
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    """An MLP teacher fitted on digits (~95% test accuracy): students distilled from it are well above chance."""
    from softlabels.datasets import load_dataset
    from softlabels.fit import fit_classifier
    from softlabels.models import build_model

    train, info = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    torch.manual_seed(0)
    teacher = build_model("mlp", info.input_shape, 10)
    assert fit_classifier(teacher, train, test, epochs=8, seed=0, progress=False)["test_accuracy"] > 0.9
    path = tmp_path_factory.mktemp("teacher") / "digits-mlp.pt"
    torch.save(teacher.state_dict(), path)
    return path


def test_ray_dump_to_s3_then_train_from_s3_and_http(ray_session, s3, http_root, digits_weights, cli, tmp_path,
                                                    monkeypatch, one_torch_thread):
    # Ray is already running: its workers never see these variables, so the dump must carry them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = _url("digits.zarr")
    dump = ["dump", "--teacher", "builtin:mlp", "--weights", digits_weights, "--dataset", "digits", "--out", url,
            "--workers", "2", "--k", "10", "--temperatures", "1,2", "--batch-size", "128", "--quiet"]
    code, _, err = cli(*dump)
    assert code == 0, err
    store = open_store(url)
    assert store.meta.status == "complete" and store.num_samples > 1000
    assert store.meta.summary["teacher_top1_accuracy"] > 0.9
    code, _, err = cli(*dump)
    assert code == 2 and err.strip() == f"error: {url} already exists; pass --resume to continue it or --overwrite to replace it"
    code, _, err = cli(*dump, "--resume")
    assert code == 0, err

    root, base = http_root
    name = uuid.uuid4().hex[:8]
    code, _, err = cli("copy", url, root / name / "digits.zarr", "--quiet")  # s3 -> the web server's directory
    assert code == 0, err
    accuracies = []
    for store_url in (url, f"{base}/{name}/digits.zarr"):
        out = tmp_path / uuid.uuid4().hex[:8]
        code, stdout, err = cli("train", "--store", store_url, "--dataset", "digits", "--student", "builtin:mlp",
                                "--method", "kd", "--temperature", "2", "--epochs", "3", "--seed", "1", "--quiet",
                                "--out", out)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["test_accuracy"] > 0.7  # chance is 0.1
        accuracies.append([h["test_accuracy"] for h in metrics["history"]])
    assert accuracies[0] == accuracies[1]  # the same bytes, wherever they are served from
