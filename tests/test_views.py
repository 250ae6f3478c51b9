"""Multi-view dumps with explicit augmentation parameters: the trainer replays exactly the
tensor the teacher saw, for every op; parameters do not depend on workers, unit order or
resume; the store grows with V as FORMAT.md documents; mistakes are one-line errors."""

import numpy as np
import pytest
import torch

from softlabels.augment import get_policy, get_student_augment, roll_rows
from softlabels.datasets import load_dataset
from softlabels.data import BatchIndices, DistillDataset
from softlabels.errors import SpecError
from softlabels.pipelines.dump import plan_store, run_dump
from softlabels.pipelines.predictor import DumpConfig, TeacherPredictor
from softlabels.stores import format as fmt
from softlabels.stores import open_store
from softlabels.stores.verify import verify_store
from softlabels.stores.writer import StoreWriter

from assertions import one_line_error

MNIST = "mnist1d:num_samples=1000"  # 800 train rows: 13 units of 64 rows with the layout below


def _config(out, weights, **kw):
    base = dict(teacher="builtin:cnn", weights=str(weights), dataset=MNIST, out=str(out), k=5,
                temperatures=(1.0, 4.0), batch_size=50, threads_per_worker=1, views=3,
                augment="shift1d:max=5", augment_seed=11, rows_per_shard=64, rows_per_chunk=64)
    base.update(kw)
    return DumpConfig(**base)


def _dump_in_process(config, units=None, capture=None):
    """Plan + write ``units`` (default all) with an in-process predictor; optionally record
    every tensor the teacher receives (a forward pre-hook)."""
    predictor = TeacherPredictor(config, device=torch.device("cpu"))
    schema, weight, bias = plan_store(config, predictor)
    writer = StoreWriter.create(config.out, schema, classifier_weight=weight, classifier_bias=bias, overwrite=True)
    hook = None
    if capture is not None:
        hook = predictor.model.register_forward_pre_hook(lambda module, args: capture.append(args[0].clone()))
    for unit in writer.pending_units() if units is None else units:
        writer.mark_complete(unit, predictor.write_unit(unit))
    if hook is not None:
        hook.remove()
    if not writer.pending_units():
        writer.finalize()
    return predictor, writer


def _teacher_saw(capture, views, batch_rows):
    """Captured batches are (batch, view) in order: regroup as view -> all rows."""
    out = {v: [] for v in range(views)}
    for i, x in enumerate(capture):  # batches in row order, the V views of a batch in a row
        out[i % views].append(x)
    return {v: torch.cat(xs) for v, xs in out.items()}


def _replayed(path, dataset, info, view, n):
    data = DistillDataset(dataset, str(path), info=info, fields=[fmt.TOPK_VALUES], views="next")
    return data.__getitems__(BatchIndices(range(n), view))  # epoch == view under "next"


# --------------------------------------------------------------------------------------
# bit-identical replay, every op
# --------------------------------------------------------------------------------------
def test_shift_view_replayed_bit_identical(tmp_path, mnist1d_teacher, one_torch_thread):
    config = _config(tmp_path / "s", mnist1d_teacher)
    capture: list[torch.Tensor] = []
    _dump_in_process(config, capture=capture)
    dataset, info = load_dataset(MNIST, "train")
    store = open_store(tmp_path / "s")
    shifts = store.array("augment/shift")[...]
    assert shifts.shape == (800, 3) and shifts.dtype == np.int16
    assert shifts.min() == -5 and shifts.max() == 5 and len(np.unique(shifts)) == 11
    assert store.schema.augmentation == {"policy": "shift1d", "params": {"max": 5}, "seed": 11, "version": 1,
                                         "arrays": {"shift": {"shape": [], "dtype": "int16"}}}
    assert store.meta.format_version == fmt.FORMAT_VERSION and verify_store(tmp_path / "s").ok
    saw = _teacher_saw(capture, 3, 800)
    for view in range(3):
        batch = _replayed(tmp_path / "s", dataset, info, view, 800)
        assert torch.equal(batch["input"], saw[view])  # bit-identical, not close
        assert (batch["view"] == view).all()
        np.testing.assert_array_equal(batch["targets"][fmt.TOPK_VALUES].numpy(), store.array("topk_values")[:, view])
        # the documented semantics: torch.roll of the eval input by the stored shift
        for row in (0, 1, 799):
            assert torch.equal(saw[view][row], torch.roll(dataset.inputs[row], int(shifts[row, view]), -1))
    assert not torch.equal(saw[0], saw[1])
    # --views random: a view per row, each row rebuilt from its own view's parameters
    data = DistillDataset(dataset, str(tmp_path / "s"), info=info, fields=[fmt.TOPK_INDICES], views="random", seed=3)
    batch = data.__getitems__(BatchIndices(range(800), 2))
    chosen = batch["view"].numpy()
    assert set(np.unique(chosen)) == {0, 1, 2}
    expected = torch.stack([saw[int(v)][row] for row, v in enumerate(chosen)])
    assert torch.equal(batch["input"], expected)
    np.testing.assert_array_equal(batch["targets"][fmt.TOPK_INDICES].numpy(),
                                  store.array("topk_indices")[...][np.arange(800), chosen])


def _varied_imagefolder(root, count=10):
    """Real photo crops of different sizes (so boxes are in each image's own pixels)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        photo = photos[i % 2]
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(root / f"c{i % 2}" / f"{i:03d}.png")


def test_crop_flip_view_replayed_bit_identical(tmp_path, one_torch_thread):
    from PIL import Image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from softlabels.models import build_model

    _varied_imagefolder(tmp_path / "img")
    spec = f"imagefolder:{tmp_path / 'img'}?size=20&crop=16&mean=0.5,0.5,0.5&std=0.25,0.25,0.25"
    torch.manual_seed(0)
    torch.save(build_model("mlp", (3, 16, 16), 2).state_dict(), tmp_path / "mlp.pt")
    config = _config(tmp_path / "s", tmp_path / "mlp.pt", teacher="builtin:mlp", dataset=spec, k=2, views=4,
                     augment="crop-flip:min_scale=0.2", batch_size=4, rows_per_shard=0, rows_per_chunk=0)
    capture: list[torch.Tensor] = []
    _dump_in_process(config, capture=capture)
    dataset, info = load_dataset(spec, "train")
    store = open_store(tmp_path / "s")
    box, flip = store.array("augment/box")[...], store.array("augment/flip")[...]
    assert box.shape == (10, 4, 4) and box.dtype == np.int32 and flip.shape == (10, 4) and flip.dtype == np.uint8
    assert set(np.unique(flip)) == {0, 1}
    sizes = np.array([dataset.image_size(i) for i in range(10)])
    # view 0 is the evaluation view: stored as box (0, 0, 0, 0), never flipped
    assert (box[:, 0] == 0).all() and (flip[:, 0] == 0).all()
    box, flip = box[:, 1:], flip[:, 1:]
    top, left, h, w = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= sizes[:, None, 0]).all() and (left + w <= sizes[:, None, 1]).all()
    area = (h * w) / (sizes[:, None, 0] * sizes[:, None, 1])
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1.0
    # captured batches: 3 batches (4, 4, 2 rows) x 4 views
    saw = {v: torch.cat([capture[b * 4 + v] for b in range(3)]) for v in range(4)}
    # view 0 equals the evaluation transform, bit for bit: what the dataset returns for item i
    assert torch.equal(saw[0], torch.stack([dataset[i][0] for i in range(10)]))
    for view in range(4):
        batch = _replayed(tmp_path / "s", dataset, info, view, 10)
        assert batch["input"].shape == (10, 3, 16, 16)
        assert torch.equal(batch["input"], saw[view])
        if view == 0:
            continue
        # independent replay from FORMAT.md alone: decode, resized_crop (bilinear, antialias), flip, normalise
        for row in range(10):
            img = F.pil_to_tensor(Image.open(dataset.paths[row]).convert("RGB"))
            t, lf, hh, ww = (int(v) for v in box[row, view - 1])
            ref = F.resized_crop(img, t, lf, hh, ww, [16, 16], interpolation=InterpolationMode.BILINEAR, antialias=True)
            if flip[row, view - 1]:
                ref = F.horizontal_flip(ref)
            ref = (ref.float() / 255 - 0.5) / 0.25
            torch.testing.assert_close(saw[view][row], ref, atol=1e-5, rtol=0)
    # so the figures of view 0 are those of a clean single-view dump of the same split
    _dump_in_process(DumpConfig(**{**config.to_dict(), "out": str(tmp_path / "clean"), "views": 1, "augment": "none",
                                   "temperatures": config.temperatures, "feature_layers": config.feature_layers}))
    clean = open_store(tmp_path / "clean")
    np.testing.assert_array_equal(clean.array("topk_values")[:, 0], store.array("topk_values")[:, 0])
    view0 = store.meta.summary["view0"]
    assert view0 == {key: clean.meta.summary[key] for key in view0}
    # DataLoader worker processes build the same views: every array identical
    _dump_in_process(DumpConfig(**{**config.to_dict(), "out": str(tmp_path / "s2"), "loader_workers": 2,
                                   "temperatures": config.temperatures, "feature_layers": config.feature_layers}))
    other = open_store(tmp_path / "s2")
    for spec in store.schema.per_sample_arrays():
        np.testing.assert_array_equal(store.array(spec.name)[...], other.array(spec.name)[...], err_msg=spec.name)


def test_multi_view_file_dump_streams_all_units_through_one_loader(tmp_path, monkeypatch, one_torch_thread):
    """A multi-view dump of image files decodes through the worker's one persistent stream (one
    DataLoader, one decode process for every unit, prefetching across units as the Ray actor
    announces them), and gets exactly the arrays of a dump decoded in-process."""
    from softlabels.models import build_model

    _varied_imagefolder(tmp_path / "img", count=20)
    spec = f"imagefolder:{tmp_path / 'img'}?size=16&crop=16"
    torch.manual_seed(0)
    torch.save(build_model("mlp", (3, 16, 16), 2).state_dict(), tmp_path / "mlp.pt")
    made = []
    original = torch.utils.data.DataLoader.__init__

    def counting(self, *args, **kwargs):
        made.append(kwargs.get("num_workers", 0))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", counting)
    stores = {}
    for workers in (1, 0):
        config = _config(tmp_path / f"w{workers}", tmp_path / "mlp.pt", teacher="builtin:mlp", dataset=spec, k=2,
                         views=2, augment="crop-flip", batch_size=3, rows_per_shard=4, rows_per_chunk=4,
                         loader_workers=workers)
        predictor = TeacherPredictor(config, device=torch.device("cpu"))
        schema, weight, bias = plan_store(config, predictor)
        writer = StoreWriter.create(config.out, schema, classifier_weight=weight, classifier_bias=bias)
        assert schema.num_units == 5
        made.clear()
        for unit in range(schema.num_units):  # announced up front, as calls reach the actor
            predictor.announce(*schema.unit_range(unit))
        for unit in range(schema.num_units):
            writer.mark_complete(unit, predictor.write_unit(unit))
        writer.finalize()
        assert made == [workers], f"{len(made)} DataLoaders for {schema.num_units} units"
        stores[workers] = open_store(config.out)
    for spec_ in stores[0].schema.per_sample_arrays():
        np.testing.assert_array_equal(stores[1].array(spec_.name)[...], stores[0].array(spec_.name)[...],
                                      err_msg=spec_.name)


# --------------------------------------------------------------------------------------
# determinism: workers, unit order, resume
# --------------------------------------------------------------------------------------
def test_params_independent_of_workers_unit_order_and_resume(ray_session, tmp_path, mnist1d_teacher):
    reference = _config(tmp_path / "ray2", mnist1d_teacher)
    run_dump(reference, workers=2)
    # in-process, units in reverse order and a different batch size, interrupted after 5 units ...
    other = _config(tmp_path / "resumed", mnist1d_teacher, batch_size=64)
    predictor, writer = _dump_in_process(other, units=[12, 9, 7, 3, 1])
    assert writer.meta["status"] != "complete" and len(writer.pending_units()) == 8
    del predictor, writer
    # ... then resumed on one Ray worker
    result = run_dump(other, workers=1, resume=True)
    assert result.units_written == 8
    a, b = open_store(tmp_path / "ray2"), open_store(tmp_path / "resumed")
    assert b.meta.status == "complete" and verify_store(tmp_path / "resumed").ok
    for spec in a.schema.per_sample_arrays():
        x, y = a.array(spec.name)[...], b.array(spec.name)[...]
        if spec.name.startswith(fmt.AUGMENT_PREFIX) or spec.name in (fmt.TOPK_INDICES, fmt.LABELS):
            np.testing.assert_array_equal(x, y, err_msg=spec.name)
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=4e-3, rtol=1e-3, err_msg=spec.name)


def test_policy_parameters_depend_only_on_seed_sample_and_view():
    policy = get_policy("shift1d:max=6")
    index = np.arange(100)
    full = policy.sample(3, index, 4, None)["shift"]
    assert np.array_equal(policy.sample(3, index[::-1], 4, None)["shift"], full[::-1])
    assert np.array_equal(policy.sample(3, index[40:60], 2, None)["shift"], full[40:60, :2])
    assert not np.array_equal(policy.sample(4, index, 4, None)["shift"], full)
    x = torch.randn(5, 40)
    s = torch.tensor([0, 3, -3, 6, -6])
    assert all(torch.equal(roll_rows(x, s)[r], torch.roll(x[r], int(s[r]))) for r in range(5))


# --------------------------------------------------------------------------------------
# size: grows with V as docs/FORMAT.md documents
# --------------------------------------------------------------------------------------
def test_store_size_grows_with_views_as_documented(tmp_path, mnist1d_teacher, one_torch_thread):
    sizes = {}
    for views in (1, 2, 4):
        config = _config(tmp_path / f"v{views}", mnist1d_teacher, views=views, feature_layers=(),
                         rows_per_shard=0, rows_per_chunk=0)
        _, writer = _dump_in_process(config)
        schema = writer.schema
        k, temps = 5, 2
        # FORMAT.md: per row, V * (k*(2+2) + 4*|T| + 2 [label_logit] + 2 [augment/shift]) + 4 [labels]
        assert schema.logical_bytes_per_sample() == views * (k * 4 + 4 * temps + 2 + 2) + 4
        sizes[views] = writer.bytes_on_disk()
    # on disk (compressed): every extra view adds about the same number of bytes
    per_view_12 = sizes[2] - sizes[1]
    per_view_24 = (sizes[4] - sizes[2]) / 2
    assert per_view_12 > 0 and 0.8 < per_view_24 / per_view_12 < 1.25, sizes
    # ... and never more than the uncompressed per-view bytes (800 rows x 32 B) plus chunk overheads
    assert per_view_24 < 800 * (5 * 4 + 4 * 2 + 2 + 2) * 1.05, sizes


# --------------------------------------------------------------------------------------
# trainer: CLI replay and student-only extras
# --------------------------------------------------------------------------------------
def test_train_cli_replays_views_and_student_augment_is_fresh(cli, tmp_path, mnist1d_teacher, one_torch_thread):
    import json

    _dump_in_process(_config(tmp_path / "s", mnist1d_teacher, feature_layers=()))
    code, out, err = cli("train", "--store", tmp_path / "s", "--dataset", MNIST, "--method", "kd", "--epochs", "2",
                         "--views", "random", "--student-augment", "noise:std=0.01", "--workers", "1", "--quiet", "--out", tmp_path / "t")
    assert code == 0, err
    code, out, err = cli("info", tmp_path / "s")
    assert code == 0, err
    assert "augmentation" in out and "shift1d:max=5 seed=11 (augment/shift)" in " ".join(out.split())
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["replayed_augmentation"] == ["shift1d"] and metrics["student_augment"] == "noise:std=0.01"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    dataset, info = load_dataset(MNIST, "train")
    plain = DistillDataset(dataset, None, info=info, student_augment="shift1d:max=4", seed=5)
    e0, e0_again, e1 = (plain.__getitems__(BatchIndices(range(64), e)) for e in (0, 0, 1))
    assert torch.equal(e0["input"], e0_again["input"]) and not torch.equal(e0["input"], e1["input"])
    assert not torch.equal(e0["input"], dataset.inputs[:64])
    assert torch.equal(e0["label"], dataset.targets[:64])
    # each row is some roll of the original by at most 4
    for row in range(8):
        assert any(torch.equal(e0["input"][row], torch.roll(dataset.inputs[row], s)) for s in range(-4, 5))


# --------------------------------------------------------------------------------------
# mistakes: one line, exit 2, no store
# --------------------------------------------------------------------------------------


def test_view_and_augment_errors(cli, tmp_path, mnist1d_teacher):
    base = ["dump", "--teacher", "builtin:cnn", "--weights", mnist1d_teacher, "--dataset", MNIST,
            "--out", tmp_path / "s", "--quiet", "--workers", "1"]
    one_line_error(*cli(*base, "--views", "0"), "--views must be at least 1")
    one_line_error(*cli(*base, "--views", "4"), "without --augment", "--augment POLICY")
    one_line_error(*cli(*base, "--views", "2", "--augment", "rotate"), "unknown augmentation policy 'rotate'",
                    "shift1d", "crop-flip")
    one_line_error(*cli(*base, "--views", "2", "--augment", "shift1d:max=x"), "max must be an integer")
    one_line_error(*cli(*base, "--views", "2", "--augment", "shift1d:max=40"), "below the signal length 40")
    one_line_error(*cli(*base, "--views", "2", "--augment", "crop-flip"), "crop-flip needs images", "shift1d")
    assert not (tmp_path / "s").exists()
    train = ["train", "--dataset", MNIST, "--method", "ce", "--epochs", "1", "--quiet", "--out", tmp_path / "t"]
    one_line_error(*cli(*train, "--student-augment", "flip"), "flip needs images")
    one_line_error(*cli(*train, "--student-augment", "jitter"), "unknown student augmentation 'jitter'", "noise")
    with pytest.raises(SpecError, match="min_scale/min_ratio"):
        get_policy("crop-flip:min_scale=0.9,max_scale=0.5")
    assert get_student_augment("none") is None


def test_from_logits_writes_augmented_store(tmp_path):
    from softlabels.stores.from_logits import write_store_from_logits

    policy = get_policy("shift1d:max=3")
    shifts = policy.sample(0, np.arange(300), 2, None)
    logits = np.random.default_rng(0).normal(size=(300, 2, 6)).astype(np.float32)
    write_store_from_logits(tmp_path / "s", logits, k=3, labels=np.arange(300) % 6, augmentation=policy.metadata(0),
                            augment_params=shifts, rows_per_shard=256, rows_per_chunk=128)
    store = open_store(tmp_path / "s")
    assert store.schema.per_sample_arrays()[-1].name == "augment/shift" and verify_store(tmp_path / "s").ok
    np.testing.assert_array_equal(store.read([5, 299], ["augment/shift"], view=1)["augment/shift"], shifts["shift"][[5, 299], 1])


def test_replay_path_never_imports_the_teacher():
    import subprocess
    import sys

    code = ("import sys, softlabels.augment, softlabels.data, softlabels.train; "
            "print(sorted(m for m in sys.modules if m.startswith(('softlabels.teachers', 'softlabels.pipelines'))))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
