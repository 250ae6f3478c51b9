"""Issue 18, breaks 5-8: `softlabels copy` from untrusted sources. Nothing is written outside the
destination, symbolic links are never followed, and a copy that fails (or is interrupted) leaves
the old destination as it was and never leaves a store marked complete that does not verify."""

import json
import os
import shutil
import uuid

import pytest

from test_remote import http_root, s3  # noqa: F401 - the shared moto and static HTTP servers
from untrusted_helpers import copy_tree, digits_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return digits_store(tmp_path_factory.mktemp("copy") / "s.zarr")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(code, err):
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- break 7: bucket keys that climb out of the destination --------------------------------------
def test_copy_from_a_bucket_with_traversal_keys_writes_nothing_outside(pristine, s3, cli, tmp_path):  # noqa: F811
    prefix = f"{uuid.uuid4().hex[:8]}/evil.zarr"
    url = f"s3://team/{prefix}"
    code, _, err = cli("copy", pristine, url, *s3["flags"], "--quiet")
    assert code == 0, err
    evil = ["x/../../../escaped/owned", "x/../../../../escaped2/owned"]
    for key in evil:
        s3["client"].put_object(Bucket="team", Key=f"{prefix}/{key}", Body=b"#!/bin/sh\necho owned\n")
    dst = tmp_path / "a" / "b" / "local.zarr"
    code, _, err = cli("copy", url, dst, *s3["flags"], "--quiet")
    line = _one_line(code, err)
    assert "refusing to copy" in line and "not a plain relative key" in line and "x/../../../" in line
    for key in evil:
        assert not os.path.exists(os.path.normpath(os.path.join(dst, key))), key
    assert not dst.exists() and not list(tmp_path.rglob("owned"))


def test_absolute_and_empty_segment_keys_are_refused_before_anything_is_written(pristine, s3, cli, tmp_path):  # noqa: F811
    prefix = f"{uuid.uuid4().hex[:8]}/evil.zarr"
    url = f"s3://team/{prefix}"
    assert cli("copy", pristine, url, *s3["flags"], "--quiet")[0] == 0
    s3["client"].put_object(Bucket="team", Key=f"{prefix}//{tmp_path}/escaped/owned", Body=b"owned")
    code, _, err = cli("copy", url, tmp_path / "dst.zarr", *s3["flags"], "--quiet")
    line = _one_line(code, err)
    assert "refusing to copy" in line
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dst.zarr").exists()


# -- break 8: symbolic links in a local source ---------------------------------------------------
def test_symlinks_in_a_local_source_are_refused_and_never_echoed(pristine, cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-CREDENTIALS")
    store = copy_tree(pristine, tmp_path / "linked.zarr")
    os.symlink(secret, store / "notes")
    code, _, err = cli("copy", store, tmp_path / "out.zarr", "--quiet")
    line = _one_line(code, err)
    assert "refusing to copy" in line and "symbolic link (notes)" in line
    assert not (tmp_path / "out.zarr").exists()
    code, _, err = cli("verify", store)
    assert code == 1 and "bad: object notes: a symbolic link; a store holds only plain files" in err
    assert "TOPSECRET" not in err

    (store / "notes").unlink()
    chunk = store / "topk_values" / "c" / "1" / "0" / "0"
    chunk.unlink()
    os.symlink(secret, chunk)  # a chunk that is a link to a secret file
    code, _, err = cli("verify", store)
    assert code == 1 and "bad: object topk_values/c/1/0/0: a symbolic link" in err
    assert "TOPSECRET" not in err and "bad: chunk topk_values/c/1/0/0:" in err
    line = _one_line(*cli("copy", store, tmp_path / "out.zarr", "--quiet")[::2])
    assert "symbolic link (topk_values/c/1/0/0)" in line and "TOPSECRET" not in line
    line = _one_line(*cli("train", "--store", store, "--dataset", "digits", "--method", "kd-topk", "--epochs", "1",
                          "--quiet", "--out", tmp_path / "r")[::2])
    assert "topk_values" in line and "TOPSECRET" not in line


def test_overwrite_onto_a_symlinked_destination_is_refused(pristine, cli, tmp_path):
    target = copy_tree(pristine, tmp_path / "real.zarr")
    before = _files(target)
    os.symlink(target, tmp_path / "link.zarr")
    line = _one_line(*cli("copy", pristine, tmp_path / "link.zarr", "--overwrite", "--quiet")[::2])
    assert "refusing to overwrite" in line and "symbolic link" in line
    assert os.path.islink(tmp_path / "link.zarr") and _files(target) == before


# -- break 5: a failing source must not cost the good destination --------------------------------
@pytest.mark.parametrize("damage", ["missing chunk", "flipped byte"])
def test_copy_overwrite_from_a_failing_source_keeps_the_old_destination(pristine, cli, tmp_path, damage):
    dst = copy_tree(pristine, tmp_path / "good.zarr")
    before = _files(dst)
    src = copy_tree(pristine, tmp_path / "bad.zarr")
    chunk = src / "logsumexp" / "c" / "2" / "0" / "0"
    if damage == "missing chunk":
        chunk.unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    code, _, err = cli("copy", src, dst, "--overwrite", "--quiet")
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: "), err
    assert _files(dst) == before
    assert cli("verify", dst)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zarr", "good.zarr"]  # no staging left behind


# -- break 6: a copy killed during its final verify ----------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_a_copy_killed_while_verifying_leaves_no_store_marked_complete(pristine, cli, tmp_path, monkeypatch, existing):
    import softlabels.stores.copy as copy_module

    dst = tmp_path / "dst.zarr"
    if existing:
        copy_tree(pristine, dst)
    before = _files(dst) if existing else None

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(copy_module, "verify_store", killed)
    args = ["copy", pristine, dst, "--quiet"] + (["--overwrite"] if existing else [])
    code, _, _ = cli(*args)
    assert code == 130
    if existing:
        assert _files(dst) == before
    else:
        assert not (dst / "zarr.json").exists()
        code, _, err = cli("train", "--store", dst, "--dataset", "digits", "--method", "kd-topk", "--epochs", "1",
                           "--quiet", "--out", tmp_path / "r")
        assert code != 0 and not (tmp_path / "r" / "student.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_a_feature_named_dotdot_over_http_never_lands_the_root_early(pristine, http_root, cli, tmp_path):  # noqa: F811
    root, base = http_root
    name = uuid.uuid4().hex[:8]
    served = copy_tree(pristine, root / name / "s.zarr")
    doc = json.loads((served / "zarr.json").read_text())
    schema = doc["attributes"]["softlabels"]["schema"]
    schema["features"] = {"..": schema["features"].pop("penultimate")}
    schema["per_sample_arrays"] = [n.replace("features/penultimate", "features/..") for n in schema["per_sample_arrays"]]
    (served / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(served / "features")
    dst = tmp_path / "from-http.zarr"
    code, _, err = cli("copy", f"{base}/{name}/s.zarr", dst, "--quiet")
    assert code != 0 and "Traceback" not in err, err
    assert not (dst / "zarr.json").exists()
    assert not dst.exists()
