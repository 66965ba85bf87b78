"""Tests of the cost-table schema, I/O, interpolation and compatibility checks."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evict.profiler.table import CostTable, CostTableError, model_config_hash

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "example_cost_table.json"


def base() -> dict:
    return {
        "schema_version": 1,
        "metadata": {
            "model_id": "tiny-moe",
            "model_config_hash": "abcdef0123456789",
            "device": "cpu",
            "dtype": "float32",
            "tp_size": 1,
            "ep_size": 1,
            "backend": "torch",
            "versions": {"torch": "2.13.0"},
            "date": "2026-11-23",
            "context_len": 256,
            "repeats": 5,
            "notes": "",
        },
        "batch_sizes": [1, 4],
        "widths": [1, 2, 4],
        "latency_ms": {
            "median": [[10.0, 12.0, 16.0], [20.0, 22.0, 30.0]],
            "p10": [[9.0, 11.0, 15.0], [19.0, 21.0, 29.0]],
            "p90": [[11.0, 13.0, 17.0], [21.0, 23.0, 31.0]],
        },
        "fixed_ms": [1.0, 2.0],
        "expert_union": [[4.0, 6.0, 9.0], [9.0, 12.0, 16.0]],
    }


def mutate(path: str, value=None, delete: bool = False) -> dict:
    d = copy.deepcopy(base())
    keys = path.split(".")
    obj = d
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = int(keys[-1]) if isinstance(obj, list) else keys[-1]
    if delete:
        del obj[last]
    else:
        obj[last] = value
    return d


@pytest.mark.parametrize(
    ("d", "field"),
    [
        (mutate("widths", delete=True), "widths"),
        (mutate("latency_ms", delete=True), "latency_ms"),
        (mutate("latency_ms.p90", delete=True), "latency_ms.p90"),
        (mutate("metadata.model_id", delete=True), "metadata.model_id"),
        (mutate("metadata.tp_size", 0), "metadata.tp_size"),
        (mutate("schema_version", 2), "schema_version"),
        (mutate("batch_sizes", []), "batch_sizes"),
        (mutate("widths", []), "widths"),
        (mutate("widths", [1, 4, 2]), "widths"),
        (mutate("widths", [1, 2, 2]), "widths"),
        (mutate("batch_sizes", [4, 1]), "batch_sizes"),
        (mutate("widths", [0, 1, 2]), "widths"),
        (mutate("latency_ms.median.0.1", float("nan")), "latency_ms.median[0][1]"),
        (mutate("latency_ms.median.1.2", float("inf")), "latency_ms.median[1][2]"),
        (mutate("latency_ms.p10.0.0", -1.0), "latency_ms.p10[0][0]"),
        (mutate("latency_ms.median.0.0", 0.0), "latency_ms.median[0][0]"),
        (mutate("latency_ms.median.1", [20.0, 22.0]), "latency_ms.median[1]"),
        (mutate("latency_ms.median", [[10.0, 12.0, 16.0]]), "latency_ms.median"),
        (mutate("latency_ms.p10.0.1", 12.5), "latency_ms[0][1]"),  # p10 > median
        (mutate("latency_ms.p90.1.0", 19.5), "latency_ms[1][0]"),  # p90 < median
        (mutate("fixed_ms", [1.0]), "fixed_ms"),
        (mutate("fixed_ms.1", float("nan")), "fixed_ms[1]"),
        (mutate("expert_union.0", [1.0, 2.0]), "expert_union[0]"),
        (mutate("latency_ms.median.0.0", "10"), "latency_ms.median[0][0]"),
        (mutate("metadata", []), "metadata"),
    ],
)
def test_malformed_tables_name_the_field(d, field, tmp_path):
    with pytest.raises(CostTableError) as exc:
        CostTable.from_dict(d, source="t.json")
    msg = str(exc.value)
    assert f"'{field}'" in msg and "t.json" in msg and "evict-profile" in msg
    # the same through a file: the message names the file
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CostTableError, match="bad.json"):
        CostTable.load(p)


def test_missing_file_and_invalid_json(tmp_path):
    with pytest.raises(CostTableError, match="not found.*evict-profile"):
        CostTable.load(tmp_path / "nope.json")
    p = tmp_path / "broken.json"
    p.write_text('{"schema_version": 1,,}')
    with pytest.raises(CostTableError, match="broken.json.*invalid JSON at line 1"):
        CostTable.load(p)
    assert issubclass(CostTableError, ValueError)


def test_save_load_round_trip(tmp_path):
    t = CostTable.from_dict(base())
    p = tmp_path / "sub" / "table.json"
    t.save(p)
    t2 = CostTable.load(p)
    assert t2.to_dict() == t.to_dict() == base()
    assert t2 == t
    assert p.read_text().startswith("{\n  ")  # pretty-printed
    assert not [q for q in p.parent.iterdir() if q.name != "table.json"]  # no temp file left
    # optional fields may be absent and stay absent
    d = base()
    del d["fixed_ms"], d["expert_union"]
    t3 = CostTable.from_dict(d)
    t3.save(p)
    assert CostTable.load(p).to_dict() == d
    # unknown top-level fields (a newer writer's) survive the round trip
    d["draft_tree"] = {"steps": 5, "topk": 4}
    CostTable.from_dict(d).save(p)
    assert CostTable.load(p).to_dict() == d


def test_example_table_loads():
    t = CostTable.load(EXAMPLE)
    assert t.batch_sizes == [1, 4, 16] and t.widths == [1, 2, 4, 8, 16, 32, 64]
    assert "llustrative" in t.metadata["notes"]
    c = t.step_cost(16, t.widths)
    assert bool((c[1:] >= c[:-1]).all())


def test_step_cost_grid_points_and_interpolation(caplog):
    t = CostTable.from_dict(base())
    with caplog.at_level(logging.WARNING, logger="evict"):
        # grid points: fixed + median
        assert t.step_cost(1, [1, 2, 4]).tolist() == pytest.approx([11.0, 13.0, 17.0])
        assert t.step_cost(4, torch.tensor([1, 2, 4])).tolist() == pytest.approx([22.0, 24.0, 32.0])
        # width interpolation: width 3 is halfway between 2 and 4
        assert t.step_cost(1, [3]).tolist() == pytest.approx([15.0])
        # batch interpolation: bs 2 is 1/3 of the way from 1 to 4 (fixed interpolates too)
        assert t.step_cost(2, [1]).tolist() == pytest.approx([11.0 + (22.0 - 11.0) / 3])
        # both
        v13 = 15.0 + (28.0 - 15.0) / 3  # width 3: bs1 = 15, bs4 = 2 + 26 = 28
        assert t.step_cost(2, [3]).tolist() == pytest.approx([v13])
    assert not caplog.records
    c = t.step_cost(2, [1, 2, 4])
    assert c.dtype == torch.float32 and c.shape == (3,)


def test_step_cost_clamps_outside_grid_and_warns_once(caplog):
    t = CostTable.from_dict(base())
    with caplog.at_level(logging.WARNING, logger="evict"):
        assert t.step_cost(64, [1, 4]).tolist() == pytest.approx([22.0, 32.0])
        assert t.step_cost(1, [8, 64]).tolist() == pytest.approx([17.0, 17.0])
        t.step_cost(100, [100])
    warnings = [r for r in caplog.records if "clamped" in r.getMessage()]
    assert len(warnings) == 1
    # a new table object warns again (once)
    caplog.clear()
    t2 = CostTable.from_dict(base())
    with caplog.at_level(logging.WARNING, logger="evict"):
        t2.step_cost(128, [1])
        t2.step_cost(128, [1])
    assert len([r for r in caplog.records if "clamped" in r.getMessage()]) == 1


def test_single_point_grid():
    d = base()
    d.update(batch_sizes=[8], widths=[4], fixed_ms=[0.5], expert_union=None)
    d["latency_ms"] = {"median": [[3.0]], "p10": [[2.0]], "p90": [[4.0]]}
    t = CostTable.from_dict(d)
    assert t.step_cost(8, [4]).tolist() == [3.5]
    assert t.step_cost(1, [1, 64]).tolist() == [3.5, 3.5]


def test_check_compatible(caplog):
    t = CostTable.from_dict(base())
    assert t.check_compatible(model_id="tiny-moe", config_hash="abcdef0123456789", device="CPU") == []
    assert t.check_compatible(tp_size=1, dtype="torch.float32") == []
    with pytest.raises(CostTableError) as exc:
        t.check_compatible(model_id="tiny-moe", config_hash="ffff", tp_size=2)
    msg = str(exc.value)
    assert "model_config_hash" in msg and "tp_size" in msg and "model_id" not in msg.split("profiled")[1]
    # the fix names what a user can type: the CLI flag and the plugin's variable, not a Python argument
    assert "evict-profile" in msg and "allow_mismatch" not in msg
    assert "--allow-table-mismatch" in msg and "EVICT_ALLOW_TABLE_MISMATCH=1" in msg
    with caplog.at_level(logging.WARNING, logger="evict"):
        problems = t.check_compatible(device="cuda:0", allow_mismatch=True)
    assert len(problems) == 1 and "device" in problems[0]
    assert any("device" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_respects_the_umask_and_replaces_atomically(tmp_path, umask):
    """mkstemp creates 0600 files; a saved table must get 0666 & ~umask like any file the user writes
    (a server running as another user has to read it)."""
    import os

    p = tmp_path / "table.json"
    old = os.umask(umask)
    try:
        CostTable.from_dict(base()).save(p)
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.umask(old) == old  # save restored the process umask
    os.umask(old)


def test_save_interrupted_keeps_the_previous_table_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    p = tmp_path / "table.json"
    CostTable.from_dict(base()).save(p)
    before = p.read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        CostTable.from_dict(base()).scaled(2.0).save(p)
    assert p.read_text() == before
    assert [q.name for q in tmp_path.iterdir()] == ["table.json"]


def test_save_to_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CostTableError, match="is a directory; give a file path"):
        CostTable.from_dict(base()).save(tmp_path)


def test_model_config_hash():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 256, "num_experts": 32, "num_experts_per_tok": 4}
    h = model_config_hash(cfg)
    assert len(h) == 16 and int(h, 16) >= 0
    # key order and non-architecture fields do not matter
    same = dict(reversed(list(cfg.items())))
    same["_name_or_path"] = "/somewhere/else"
    same["torch_dtype"] = "bfloat16"
    assert model_config_hash(same) == h
    assert model_config_hash({**cfg, "num_experts": 64}) != h

    class Cfg:
        def to_dict(self):
            return cfg

    assert model_config_hash(Cfg()) == h


def test_scaled_and_shifted():
    t = CostTable.from_dict(base())
    s = t.scaled(2.0)
    assert s.step_cost(1, [1, 4]).tolist() == pytest.approx([22.0, 34.0])
    assert t.step_cost(1, [1, 4]).tolist() == pytest.approx([11.0, 17.0])  # original untouched
    assert "scaled" in s.metadata["notes"] and "scaled" not in t.metadata.get("notes", "")
    h = t.shifted(3.0)
    assert h.step_cost(4, [2]).tolist() == pytest.approx([27.0])
    assert h.to_dict()["latency_ms"]["p10"][0][0] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="non-positive"):
        t.shifted(-9.5)
    with pytest.raises(ValueError):
        t.scaled(0.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.1, 5.0), min_size=6, max_size=6),
    st.floats(1.0, 4.0),
    st.floats(1.0, 4.0),
)
def test_interpolation_stays_between_neighbours(increments, bs, width):
    # a monotone grid stays monotone and bounded by its neighbours after interpolation
    d = base()
    med = [[10.0, 10.0 + increments[0], 10.0 + increments[0] + increments[1]]]
    extra = [increments[2], increments[2] + increments[3], increments[2] + increments[3] + increments[4]]
    med.append([m + e for m, e in zip(med[0], extra)])  # monotone in width and in batch size
    d["latency_ms"] = {"median": med, "p10": med, "p90": med}
    t = CostTable.from_dict(d)
    c = float(t.step_cost(bs, [width])[0])
    lo = float(t.step_cost(1, [1])[0])
    hi = float(t.step_cost(4, [4])[0])
    assert lo - 1e-4 <= c <= hi + 1e-4
    assert float(t.step_cost(bs, [width + 0.5])[0]) >= c - 1e-4


def test_config_hash_same_for_raw_json_and_loaded_hf_config():
    """transformers renames num_experts -> num_local_experts in to_dict(); the hash must not care."""
    transformers = pytest.importorskip("transformers")
    from evict.models import TESTBED_DIR

    cfg_dir = TESTBED_DIR / "target"
    if not (cfg_dir / "config.json").exists():
        pytest.skip("shipped testbed target not present")
    raw = json.loads((cfg_dir / "config.json").read_text())
    loaded = transformers.AutoConfig.from_pretrained(cfg_dir)
    assert model_config_hash(raw) == model_config_hash(loaded)
    changed = dict(raw, num_experts=raw["num_experts"] * 2)
    assert model_config_hash(changed) != model_config_hash(raw)
