"""EVICT_* configuration parsing and cost-table checks (pure: runs without sglang)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from evict.plugin.config import (
    DEFAULT_LOG_INTERVAL,
    ENV_VARS,
    EvictConfig,
    EvictConfigError,
    load_cost_table,
    parse_env,
    resolve_widths,
)


def make_table_dict(widths=(1, 2, 4, 8, 16, 32), batch_sizes=(1, 8), **meta) -> dict:
    """A valid schema-1 cost table whose latency rises with width."""
    metadata = {"model_id": "tiny", "device": "NVIDIA H100", "dtype": "bfloat16", "tp_size": 1}
    metadata.update(meta)
    median = [[1.0 + 0.1 * w * b for w in widths] for b in batch_sizes]
    return {
        "schema_version": 1,
        "metadata": metadata,
        "batch_sizes": list(batch_sizes),
        "widths": list(widths),
        "latency_ms": {
            "median": median,
            "p10": [[0.9 * v for v in row] for row in median],
            "p90": [[1.1 * v for v in row] for row in median],
        },
    }


def write_table(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "table.json"
    p.write_text(json.dumps(d))
    return p


def test_defaults_from_empty_environment():
    cfg = parse_env({"PATH": "/bin", "SGLANG_X": "1"})
    assert cfg == EvictConfig(
        cost_table=None,
        widths=None,
        decision="immediate",
        disable=False,
        allow_table_mismatch=False,
        backend="torch",
        log_interval=DEFAULT_LOG_INTERVAL,
        recalibrate=False,
        acceptance="raw",
    )
    assert cfg.policy_decision == "immediate"


def test_all_variables_parsed():
    cfg = parse_env(
        {
            "EVICT_COST_TABLE": " t.json ",
            "EVICT_WIDTHS": "16, 4,8",
            "EVICT_DECISION": "Lagged",
            "EVICT_DISABLE": "yes",
            "EVICT_ALLOW_TABLE_MISMATCH": "true",
            "EVICT_BACKEND": "triton",
            "EVICT_LOG_INTERVAL": "7",
            "EVICT_RECALIBRATE": "1",
            "EVICT_CACHE_DIR": "/tmp/somewhere",
            "EVICT_ACCEPTANCE": " Calibrated",
        }
    )
    assert cfg.recalibrate and cfg.acceptance == "calibrated"
    assert cfg.cost_table == Path("t.json")
    assert cfg.widths == (4, 8, 16)
    assert (cfg.decision, cfg.disable, cfg.allow_table_mismatch, cfg.backend, cfg.log_interval) == (
        "lagged",
        True,
        True,
        "triton",
        7,
    )
    assert cfg.policy_decision == "off"  # the kill switch wins over the decision mode


def test_unknown_variable_names_the_closest_known_one():
    with pytest.raises(EvictConfigError, match=r"EVICT_WIDHTS \(did you mean EVICT_WIDTHS\?\)"):
        parse_env({"EVICT_WIDHTS": "4,8"})


def test_the_gpu_tooling_variables_reach_the_server_without_stopping_it():
    # the GPU launcher sets EVICT_CUDA_SHIM in every server process (the first live launch died on it)
    from evict.plugin.config import TOOLING_ENV_VARS

    cfg = parse_env({name: "1" for name in TOOLING_ENV_VARS})
    assert cfg == parse_env({})
    with pytest.raises(EvictConfigError, match="EVICT_CUDA_SHIMS"):
        parse_env({"EVICT_CUDA_SHIMS": "1"})


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("EVICT_DISABLE", "maybe", "not a boolean"),
        ("EVICT_ALLOW_TABLE_MISMATCH", "2", "not a boolean"),
        ("EVICT_DECISION", "eager", "immediate, lagged"),
        ("EVICT_BACKEND", "cuda", "torch, triton"),
        ("EVICT_WIDTHS", "4,x", "'x' is not an integer"),
        ("EVICT_WIDTHS", "0,4", "width 0 < 1"),
        ("EVICT_WIDTHS", "4,4", "repeats"),
        ("EVICT_WIDTHS", ",", "empty"),
        ("EVICT_LOG_INTERVAL", "ten", "not an integer"),
        ("EVICT_LOG_INTERVAL", "-1", "negative"),
        ("EVICT_RECALIBRATE", "always", "not a boolean"),
        ("EVICT_ACCEPTANCE", "learned", "raw, calibrated"),
        ("EVICT_PER_REQUEST", "sometimes", "not a boolean"),
        ("EVICT_PAD_COST", "free", "not a number"),
        ("EVICT_PAD_COST", "1.5", "outside [0, 1]"),
        ("EVICT_PAD_COST", "-0.1", "outside [0, 1]"),
        ("EVICT_PAD_COST", "nan", "outside [0, 1]"),
    ],
)
def test_bad_values_are_clear_errors(name, value, needle):
    with pytest.raises(EvictConfigError, match=name) as info:
        parse_env({name: value})
    assert needle in str(info.value)


def test_every_documented_variable_is_accepted():
    env = {name: "" for name in ENV_VARS}
    env.update({"EVICT_LOG_INTERVAL": "1", "EVICT_DECISION": "immediate", "EVICT_BACKEND": "torch"})
    assert parse_env(env).cost_table is None  # empty string = unset


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_blank_values_mean_unset_for_every_variable(blank):
    """``EVICT_X=`` is "unset" for every variable alike (it used to stop the launch for three)."""
    cfg = parse_env({name: blank for name in ENV_VARS})
    assert cfg == parse_env({})
    assert (cfg.log_interval, cfg.decision, cfg.backend, cfg.acceptance) == (
        DEFAULT_LOG_INTERVAL,
        "immediate",
        "torch",
        "raw",
    )
    assert (cfg.cost_table, cfg.widths, cfg.disable, cfg.allow_table_mismatch, cfg.recalibrate) == (
        None,
        None,
        False,
        False,
        False,
    )


def test_resolve_widths_default_adds_full_tree():
    assert resolve_widths(None, 24) == (2, 4, 8, 16, 24)
    assert resolve_widths(None, 2) == (2,)
    assert resolve_widths((1, 4), 8) == (1, 4, 8)
    assert resolve_widths((4, 8), 8) == (4, 8)


def test_resolve_widths_rejects_too_wide_and_tiny_trees():
    with pytest.raises(
        EvictConfigError, match=r"EVICT_WIDTHS=4,16 with --speculative-num-draft-tokens=8.*\[16\]"
    ):
        resolve_widths((4, 16), 8)
    with pytest.raises(EvictConfigError, match="at least 2"):
        resolve_widths(None, 1)


def test_resolve_widths_must_stay_inside_the_profiled_range():
    assert resolve_widths(None, 32, table_widths=[1, 2, 4, 8, 16, 32]) == (2, 4, 8, 16, 32)
    with pytest.raises(
        EvictConfigError, match=r"covers widths 1\.\.16.*\[32\] outside.*unset EVICT_COST_TABLE"
    ):
        resolve_widths(None, 32, table_widths=[1, 2, 4, 8, 16])
    with pytest.raises(EvictConfigError, match=r"\[1\] outside"):
        resolve_widths((1, 8), 8, table_widths=[2, 4, 8])


def test_without_a_table_the_server_calibrates():
    """EVICT_COST_TABLE is optional: unset means "calibrate at start-up", not an error."""
    assert load_cost_table(parse_env({}), config_hash="abc", tp_size=1) is None
    assert resolve_widths(None, 24, None) == (2, 4, 8, 16, 24)  # no table: no range to respect


def test_table_file_missing_or_malformed(tmp_path):
    with pytest.raises(EvictConfigError, match="file not found.*unset EVICT_COST_TABLE.*calibrates"):
        load_cost_table(parse_env({"EVICT_COST_TABLE": str(tmp_path / "nope.json")}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvictConfigError, match="invalid JSON.*EVICT_DISABLE=1"):
        load_cost_table(parse_env({"EVICT_COST_TABLE": str(bad)}))
    d = make_table_dict()
    d["latency_ms"]["median"][0][1] = -1.0
    p = write_table(tmp_path, d)
    with pytest.raises(EvictConfigError, match=r"latency_ms.median\[0\]\[1\]"):
        load_cost_table(parse_env({"EVICT_COST_TABLE": str(p)}))


def test_matching_table_loads(tmp_path):
    p = write_table(tmp_path, make_table_dict(model_config_hash="abc"))
    table = load_cost_table(
        parse_env({"EVICT_COST_TABLE": str(p)}), config_hash="abc", tp_size=1, dtype="torch.bfloat16"
    )
    assert table.widths == [1, 2, 4, 8, 16, 32]


def test_mismatched_table_stops_unless_allowed(tmp_path, caplog):
    p = write_table(tmp_path, make_table_dict(model_config_hash="abc", tp_size=2))
    env = {"EVICT_COST_TABLE": str(p)}
    with pytest.raises(EvictConfigError, match=r"tp_size.*calibrates.*EVICT_ALLOW_TABLE_MISMATCH=1"):
        load_cost_table(parse_env(env), config_hash="abc", tp_size=1)
    with pytest.raises(EvictConfigError, match="model_config_hash"):
        load_cost_table(parse_env(env), config_hash="other", tp_size=2)
    env["EVICT_ALLOW_TABLE_MISMATCH"] = "1"
    with caplog.at_level(logging.WARNING, logger="evict"):
        table = load_cost_table(parse_env(env), config_hash="abc", tp_size=1)
    assert table.widths[-1] == 32
    assert any("tp_size" in r.getMessage() for r in caplog.records)


def test_target_config_hash_matches_the_profilers_raw_json_hash(tmp_path, caplog):
    from evict.plugin.config import target_config_hash
    from evict.profiler.table import model_config_hash

    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert target_config_hash(str(tmp_path)) == model_config_hash(cfg)
    cfg["num_experts"] = 16
    assert target_config_hash(str(tmp_path)) != model_config_hash(cfg)
    with caplog.at_level(logging.WARNING):
        assert target_config_hash(str(tmp_path / "absent")) is None
    assert "not checked" in caplog.text
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(EvictConfigError, match="cannot read"):
        target_config_hash(str(tmp_path))


def test_per_request_widths_are_off_by_default_and_parsed():
    cfg = parse_env({})
    assert (cfg.per_request, cfg.pad_cost) == (False, None)
    cfg = parse_env({"EVICT_PER_REQUEST": "1", "EVICT_PAD_COST": " 0 "})
    assert (cfg.per_request, cfg.pad_cost, cfg.decision) == (True, 0.0, "immediate")


def test_per_request_widths_need_the_immediate_decision():
    with pytest.raises(EvictConfigError, match="EVICT_PER_REQUEST=1 needs EVICT_DECISION=immediate"):
        parse_env({"EVICT_PER_REQUEST": "1", "EVICT_DECISION": "lagged"})


def test_pad_cost_comes_from_the_variable_else_the_table_else_one(tmp_path):
    from types import SimpleNamespace

    from evict.plugin.config import resolve_pad_cost

    table = SimpleNamespace(metadata={"padding_cost": 0.25})
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1"}), table) == 0.25
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1", "EVICT_PAD_COST": "0.5"}), table) == 0.5
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1"}), SimpleNamespace(metadata={})) == 1.0
    assert resolve_pad_cost(parse_env({"EVICT_PER_REQUEST": "1"}), None) == 1.0
    with pytest.raises(EvictConfigError, match="padding_cost"):
        resolve_pad_cost(parse_env({}), SimpleNamespace(metadata={"padding_cost": "lots"}))
