"""benchmarks/dump_ceiling.py --quick: the zero-cost teacher goes through the real Ray dump and
writes the same store, byte for byte bar timing metadata, as a normal store of its logits."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import dump_ceiling  # noqa: E402


def test_quick_zero_cost_dump_equals_normal_store(ray_session, tmp_path, capsys):
    assert dump_ceiling.main(["--quick", "--keep", str(tmp_path)]) == 0
    assert "zero-cost dump == normal store" in capsys.readouterr().out
    dumped, reference = tmp_path / "dumped.zarr", tmp_path / "reference.zarr"
    meta = json.loads((dumped / "zarr.json").read_text())["attributes"]["softlabels"]
    assert meta["status"] == "complete" and meta["schema"]["features"] == {"penultimate": 2048}
    assert meta["schema"]["num_classes"] == 1000 and meta["summary"]["dump"]["workers"] == 2
    # the comparison is not vacuous: one flipped byte in a chunk, or in a timestamp-free field, shows
    chunk = next(p for p in (dumped / "topk_values" / "c").rglob("*") if p.is_file())  # a shard
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    assert dump_ceiling.store_differences(str(dumped), str(reference)) == [chunk.relative_to(dumped).as_posix()]
    root = json.loads((reference / "zarr.json").read_text())
    root["attributes"]["softlabels"]["schema"]["k"] = 9
    (reference / "zarr.json").write_text(json.dumps(root))
    assert "zarr.json" in dump_ceiling.store_differences(str(dumped), str(reference))
