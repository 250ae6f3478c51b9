"""Every user mistake in `softlabels dump` is one line, non-zero, and leaves no half-valid store."""

import os

import numpy as np
import torch

from assertions import one_line_error




def _args(out, weights, *extra, dataset="mnist1d:num_samples=1000", teacher="builtin:cnn"):
    args = ["dump", "--teacher", teacher, "--dataset", dataset, "--out", out, "--quiet", "--workers", "1", *extra]
    return args + (["--weights", weights] if weights else [])


def test_unknown_specs(cli, tmp_path, mnist1d_teacher):
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, teacher="builtin:nope")), "'nope'", "cnn, ")
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, teacher="magic")), "magic")
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, dataset="imagenet22k")), "unknown dataset", "mnist1d")
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, dataset="cifar100:/no/such/root")), "/no/such/root")
    assert not (tmp_path / "s").exists()


def test_bad_checkpoints(cli, tmp_path):
    one_line_error(*cli(*_args(tmp_path / "s", tmp_path / "missing.pt")), "missing.pt")
    torch.save(torch.nn.Linear(3, 3), tmp_path / "module.pt")  # a pickled module, not a state_dict
    one_line_error(*cli(*_args(tmp_path / "s", tmp_path / "module.pt")), "module.pt")
    from softlabels.models import build_model

    state = build_model("cnn", (40,), 10).state_dict()
    key = next(k for k, v in state.items() if v.ndim == 2)
    state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shapes.pt")
    one_line_error(*cli(*_args(tmp_path / "s", tmp_path / "shapes.pt")), key, "[3, 3]")
    assert not (tmp_path / "s").exists()


def test_k_larger_than_classes(cli, tmp_path, mnist1d_teacher):
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, "--k", "11")), "k=11 is outside 1..10")
    assert not (tmp_path / "s").exists()
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, "--k", "0")), "--k must be at least 1")
    one_line_error(*cli(*_args(tmp_path / "s", mnist1d_teacher, "--temperatures", "1,x")), "--temperatures")


def test_existing_and_unwritable_outputs(cli, tmp_path, mnist1d_teacher):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(*cli(*_args(out, mnist1d_teacher)), "already exists; pass --resume", "--overwrite")
    one_line_error(*cli(*_args(out, mnist1d_teacher, "--overwrite")), "refusing to overwrite", "not a softlabels store")
    assert (out / "notes.txt").read_text() == "mine"
    one_line_error(*cli(*_args(out, mnist1d_teacher, "--resume", "--overwrite")), "exclude each other")
    (tmp_path / "a-file").write_text("")
    one_line_error(*cli(*_args(tmp_path / "a-file" / "s", mnist1d_teacher)), "is a file, not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permission bits; the file case above covers it
            one_line_error(*cli(*_args(ro / "s", mnist1d_teacher)), "not writable")
    finally:
        os.chmod(ro, 0o700)


def test_resume_with_other_dataset_is_refused(cli, ray_session, tmp_path, mnist1d_teacher):
    out = tmp_path / "s"
    code, _, err = cli(*_args(out, mnist1d_teacher, "--k", "3"))
    assert code == 0, err
    # a different length
    one_line_error(*cli(*_args(out, mnist1d_teacher, "--k", "3", "--resume", dataset="mnist1d:num_samples=2000")),
                    "cannot resume", "dataset")
    # same length, different labels (another seed)
    one_line_error(*cli(*_args(out, mnist1d_teacher, "--k", "3", "--resume", dataset="mnist1d:num_samples=1000,seed=1")),
                    "cannot resume", "dataset")
    # the original settings resume to a no-op
    code, _, err = cli(*_args(out, mnist1d_teacher, "--k", "3", "--resume"))
    assert code == 0, err
    from softlabels.stores import open_store

    assert open_store(out).meta.status == "complete"
    assert np.all(open_store(out).completed_units())
