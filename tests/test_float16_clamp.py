"""float16 stores clamp log-probabilities below -65504 instead of refusing the unit (issue 19):
the dump completes, the clamped count is recorded, targets equal a float32 dump to the tolerance
of docs/FORMAT.md §2; a fresh store can be resumed with another --value-dtype."""

import numpy as np
import pytest
import torch

from softlabels.errors import SchemaMismatchError
from softlabels.pipelines.dump import run_dump
from softlabels.pipelines.predictor import DumpConfig
from softlabels.stores import open_store
from softlabels.stores.format import StoreSchema
from softlabels.stores.writer import StoreWriter
from softlabels.targets import summarize_logits

TEMPS = (1.0, 2.0, 4.0, 8.0)


def _config(out, dtype, **kw):
    return DumpConfig(teacher="wide_teacher:make", dataset="mnist1d:num_samples=400", out=str(out), k=10,
                      temperatures=TEMPS, value_dtype=dtype, batch_size=64, threads_per_worker=1,
                      rows_per_shard=128, rows_per_chunk=64, feature_layers=(), **kw)


def _probs(store):
    values = store.array("topk_values")[...].astype(np.float64)[:, 0]
    lse = store.array("logsumexp")[...].astype(np.float64)[:, 0]
    return np.stack([np.exp(values / t - lse[:, [j]]) for j, t in enumerate(TEMPS)])


def test_float16_dump_clamps_and_matches_float32(ray_session, tmp_path):
    run_dump(_config(tmp_path / "f16", "float16"), workers=1)
    run_dump(_config(tmp_path / "f32", "float32"), workers=1)
    s16, s32 = open_store(tmp_path / "f16"), open_store(tmp_path / "f32")
    v32 = s32.array("topk_values")[...]
    l32 = s32.array("label_logit")[...]
    assert (v32 < -65504).sum() == 5 * 320  # five classes per row are beyond the float16 range
    clamped = s16.meta.summary["float16_clamped"]
    assert clamped == {"topk_values": int((v32 < -65504).sum()), "label_logit": int((l32 < -65504).sum())}
    assert clamped["label_logit"] > 0
    assert s16.array("topk_values")[...].min() == -65504
    np.testing.assert_array_equal(s16.array("topk_indices")[...], s32.array("topk_indices")[...])
    # FORMAT.md §2: absolute probability error of float16 values <= 2e-4 at every stored T
    assert np.abs(_probs(s16) - _probs(s32)).max() <= 2e-4
    assert s32.meta.summary.get("float16_clamped") is None


def _schema(dtype):
    return StoreSchema(num_samples=300, num_classes=10, k=3, temperatures=(1, 2), value_dtype=dtype,
                       labeled=False, rows_per_shard=256, rows_per_chunk=128, teacher={"spec": "t"}, dataset={"spec": "d"})


def _fields(schema, unit):
    start, stop = schema.unit_range(unit)
    z = torch.randn(stop - start, 1, schema.num_classes, generator=torch.Generator().manual_seed(unit))
    return {name: t.numpy() for name, t in summarize_logits(z, schema.k, schema.temperatures).items()}


def test_resume_with_another_value_dtype(tmp_path):
    path = tmp_path / "s"
    StoreWriter.create(path, _schema("float16"))
    # nothing written yet: --resume with float32 starts the store afresh with the new settings
    w2 = StoreWriter.create(path, _schema("float32"), resume=True)
    assert w2.schema.value_dtype == "float32" and w2.pending_units() == [0, 1]
    w2.mark_complete(0, w2.write_unit(0, _fields(w2.schema, 0)))
    with pytest.raises(SchemaMismatchError, match=r"value_dtype: store has 'float32', this run has 'float16'; "
                       r"1 of 2 units are already written .* pass --overwrite instead of --resume"):
        StoreWriter.create(path, _schema("float16"), resume=True)
