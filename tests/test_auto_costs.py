"""Zero-config costs of the reference engine: shipped table if it fits, else this machine's, cached."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from evict.models import TESTBED_DIR
from evict.paths import TESTBED_COST_TABLE, cache_dir, shipped_config
from evict.profiler import auto
from evict.profiler.auto import AUTO_CONTEXT_LEN, AutoGrid, resolve_cost_table
from evict.profiler.table import CostTable, CostTableError, checkpoint_config_hash
from evict.profiler.torch_backend import device_name

TARGET = Path(TESTBED_DIR) / "target"
DRAFTER = Path(TESTBED_DIR) / "drafter"
HERE = device_name(torch.device("cpu"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVICT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _table_dict(device: str = HERE, threads: int | None = None, **meta) -> dict:
    med = [[1.0, 1.5, 2.5, 4.0], [2.0, 3.0, 5.0, 8.0]]
    return {
        "schema_version": 1,
        "metadata": {
            "model_id": "evict/testbed/target",
            "model_config_hash": checkpoint_config_hash(TARGET),
            "device": device,
            "dtype": "float32",
            "tp_size": 1,
            "num_threads": torch.get_num_threads() if threads is None else threads,
            **meta,
        },
        "batch_sizes": [1, 4],
        "widths": [1, 2, 4, 8],
        "latency_ms": {"median": med, "p10": med, "p90": med},
    }


class FakeMeasure:
    """Stands in for the profiler where a test is about the route, not about timing."""

    def __init__(self, spread: float = 1.0) -> None:
        self.calls: list[AutoGrid] = []
        self.spread = spread

    def __call__(self, model_dir, drafter_dir, *, device, dtype, grid, clock, progress, source):
        self.calls.append(grid)
        d = _table_dict(date=f"call {len(self.calls)}")
        d["latency_ms"]["p90"] = [[v * self.spread for v in row] for row in d["latency_ms"]["median"]]
        return CostTable.from_dict(d, source=source)


def _resolve(measure, shipped=False, explicit=None, allow=False, lines=None):
    return resolve_cost_table(
        explicit=explicit,
        model_dir=TARGET,
        drafter_dir=DRAFTER,
        device="cpu",
        dtype="float32",
        allow_mismatch=allow,
        shipped=shipped,
        log=(lines.append if lines is not None else lambda s: None),
        measure=measure,
        progress=False,
    )


def test_cache_dir_follows_the_override_then_xdg_then_home(tmp_path):
    assert cache_dir({"EVICT_CACHE_DIR": str(tmp_path / "x"), "XDG_CACHE_HOME": "/xdg"}) == tmp_path / "x"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "evict"
    assert cache_dir({"XDG_CACHE_HOME": "relative/ignored"}) == Path.home() / ".cache" / "evict"
    assert cache_dir({}) == Path.home() / ".cache" / "evict"


def test_measures_once_then_reuses_the_cached_table(_cache):
    measure, lines = FakeMeasure(), []
    first = _resolve(measure, lines=lines)
    assert first.how == "measured" and len(measure.calls) == 1
    assert first.path.parent == _cache / "cost_tables" and first.path.is_file()
    assert any("measuring this machine's" in line and str(first.path) in line for line in lines)
    second = _resolve(measure, lines=lines)
    assert second.how == "cached" and len(measure.calls) == 1  # not measured again
    assert second.path == first.path and second.table.metadata["date"] == "call 1"
    assert second.table.median == first.table.median


def test_the_cache_key_changes_with_what_the_table_was_measured_for():
    grid = AutoGrid()
    base = dict(config_hash="a", drafter_hash="d", device="cpu:X", dtype="float32", num_threads=2, grid=grid)
    key = auto.cache_key(**base)
    assert auto.cache_key(**base) == key and len(key) == 16
    for change in (
        {"config_hash": "b"},
        {"drafter_hash": "e"},
        {"device": "cpu:Y"},
        {"dtype": "bfloat16"},
        {"num_threads": 1},
        {"grid": AutoGrid(widths=(1, 2, 20))},
        {"grid": AutoGrid(draft_steps=4)},
        {"grid": AutoGrid(engine_overhead=False)},
        {"clock": "cpu"},
    ):
        assert auto.cache_key(**{**base, **change}) != key, change


@pytest.mark.parametrize("damage", ["not json", "foreign device", "bad grid"])
def test_a_broken_cache_file_is_ignored_with_a_warning_and_measured_again(damage, caplog):
    measure = FakeMeasure()
    path = _resolve(measure).path
    if damage == "not json":
        path.write_text("{ truncated")
    elif damage == "foreign device":
        path.write_text(json.dumps(_table_dict(device="cpu:Some Other CPU")))
    else:
        d = _table_dict()
        d["widths"] = [8, 4, 2, 1]
        path.write_text(json.dumps(d))
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="evict"):
        again = _resolve(measure, lines=lines)
    assert again.how == "measured" and len(measure.calls) == 2
    assert any("ignoring the cached cost table" in r.getMessage() for r in caplog.records)
    assert any(line.startswith("warning: ignoring the cached cost table") for line in lines)
    assert CostTable.load(path).metadata["date"] == "call 2"  # the cache holds the new table


def test_a_noisy_measurement_is_used_but_not_cached(caplog):
    """Repeats spread 10x (a busy machine): this run uses the table, the next one measures again."""
    noisy, lines = FakeMeasure(spread=10.0), []
    with caplog.at_level(logging.WARNING, logger="evict"):
        first = _resolve(noisy, lines=lines)
    assert first.how == "measured, not cached" and not first.path.exists()
    assert "busy while measuring" in caplog.text and any("not cached" in line for line in lines)
    assert auto.table_spread(first.table) == pytest.approx(10.0)
    quiet = FakeMeasure()
    assert _resolve(quiet).how == "measured" and len(quiet.calls) == 1  # measured again, then cached
    assert _resolve(quiet).how == "cached"


def test_a_shipped_table_made_for_this_setup_is_used_without_measuring(tmp_path):
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(_table_dict()))
    measure = FakeMeasure()
    choice = _resolve(measure, shipped=shipped)
    assert choice.how == "shipped" and choice.path == shipped and not measure.calls
    # another thread count is another setup on a CPU: measured instead
    shipped.write_text(json.dumps(_table_dict(threads=torch.get_num_threads() + 1)))
    lines: list[str] = []
    assert _resolve(measure, shipped=shipped, lines=lines).how == "measured"
    assert "num_threads" in lines[0]
    # --allow-table-mismatch without --cost-table keeps the shipped table, with a warning
    assert _resolve(measure, shipped=shipped, allow=True).how == "shipped"


def test_an_explicit_table_keeps_the_strict_check(tmp_path, caplog):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(_table_dict(device="cpu:Some Other CPU")))
    measure = FakeMeasure()
    with pytest.raises(CostTableError, match="metadata.device"):
        _resolve(measure, explicit=path)
    assert not measure.calls  # never replaced by a measurement
    with caplog.at_level(logging.WARNING, logger="evict"):
        assert _resolve(measure, explicit=path, allow=True).how == "explicit"
    assert "metadata.device" in caplog.text
    path.write_text(json.dumps(_table_dict()))
    assert _resolve(measure, explicit=path).table.widths == [1, 2, 4, 8]


def test_the_grid_covers_the_run_and_the_default_runs_share_one_table():
    quick = AutoGrid.covering([1, 4])
    full = AutoGrid.covering([1, 4, 16])
    assert quick == full and 1 in quick.batch_sizes and 16 in quick.batch_sizes
    wide = AutoGrid.covering([1, 32], max_width=80, draft_tree=(6, 4))
    assert 32 in wide.batch_sizes and max(wide.widths) == 80 and (wide.draft_steps, wide.draft_topk) == (6, 4)
    # timed at the run's context (a multiple of 32): a 256-token table halved no price at bs 64
    assert quick.context_len == AUTO_CONTEXT_LEN
    assert AutoGrid.covering([1], context_len=76).context_len == 64
    assert AutoGrid.covering([1], context_len=5).context_len == 32


def test_bench_on_a_foreign_shipped_table_exits_0_with_this_machines_measured_table(
    tmp_path, monkeypatch, capsys, _cache
):
    """The README's first command on a machine the shipped table was not made on (real measurement,
    tiny grid and run)."""
    import evict.bench.cli as cli

    foreign = json.loads(shipped_config(TESTBED_COST_TABLE).read_text())
    foreign["metadata"]["device"] = "cpu:Some Other CPU (rewritten by the test)"
    shipped = tmp_path / TESTBED_COST_TABLE
    shipped.write_text(json.dumps(foreign))
    monkeypatch.setattr(auto, "shipped_config", lambda name=TESTBED_COST_TABLE: shipped)
    monkeypatch.setattr(auto, "AUTO_BATCH_SIZES", (1,))
    monkeypatch.setattr(auto, "AUTO_WIDTHS", (1, 2, 4))
    monkeypatch.setattr(auto, "AUTO_REPEATS", 2)
    monkeypatch.setattr(auto, "AUTO_WARMUP", 1)
    # the load of the machine running the tests must not decide whether it is cached (that rule has
    # its own test above)
    monkeypatch.setattr(auto, "NOISY_SPREAD", float("inf"))
    argv = ["--batch-sizes", "1", "--seeds", "0", "--num-prompts", "1", "--prompt-tokens", "16"]
    argv += ["--max-new-tokens", "4", "--no-sweep", "--no-ablation", "--evict-tree", "2,2,6"]
    rc = cli.main(argv + ["--device", "cpu", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "was measured for another setup" in out and "measuring this machine's" in out
    (cached,) = (_cache / "cost_tables").glob("*.json")
    table = CostTable.load(cached)
    assert table.metadata["device"] == HERE and table.metadata["model_config_hash"] == checkpoint_config_hash(
        TARGET
    )
    assert table.widths == [1, 2, 4, 6] and table.batch_sizes == [1]  # the run's N is measured
    assert table.draft_tree == (2, 2) and table.fixed_ms is not None
    assert f"Cost table: `{cached.name}`" in (tmp_path / "out" / "results.md").read_text()
    # the next run reuses it
    shutil.rmtree(tmp_path / "out")
    assert cli.main(argv + ["--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert "reusing this machine's table" in capsys.readouterr().out


def test_the_engine_step_raises_fixed_ms_to_the_whole_step(monkeypatch):
    """fixed_ms = max(drafting, engine step at width w - verify forward at w), per batch size."""
    import evict.profiler.torch_backend as tb

    grid = AutoGrid(
        batch_sizes=(1, 4),
        widths=(1, 2, 4, 8),
        repeats=2,
        warmup=1,
        context_len=16,
        draft_steps=2,
        draft_topk=2,
    )
    seen = {}

    def fake_overhead(model_dir, drafter_dir, *, device, dtype, grid, width):
        seen["width"] = width
        # per repeat; bs 1: far above the forwards (median 1000); bs 4: below the drafting cost
        return {1: [1000.0, 1300.0, 900.0], 4: [0.001, 0.001]}

    depths = {2: {1: [0.1, 0.3, 0.5], 4: [0.2, 0.5, 0.7]}, 1: {1: [0.1, 0.2, 0.3], 4: [0.2, 0.3, 0.4]}}
    monkeypatch.setattr(
        tb, "measure_draft_depths", lambda spec, path, steps, topks: {k: depths[k] for k in topks}
    )
    table = auto.measure_table(
        TARGET, DRAFTER, device="cpu", dtype="float32", grid=grid, progress=False, step_sampler=fake_overhead
    )
    assert seen["width"] == 4  # the largest grid width <= 8 that the (2, 2) tree (N = 7) can verify
    verify_at = table.median[0][table.widths.index(4)]
    assert table.fixed_ms[0] == pytest.approx(1000.0 - verify_at, abs=1e-3)
    assert table.fixed_ms[1] == pytest.approx(0.7)
    # drafting per depth for the tree and for a chain: what the whole-step decision prices
    assert table.draft_ms == {2: [[0.1, 0.3, 0.5], [0.2, 0.5, 0.7]], 1: [[0.1, 0.2, 0.3], [0.2, 0.3, 0.4]]}
    assert "whole decode step at width 4" in table.metadata["fixed_ms"]
    assert "2 forwards x 2 tokens" in table.metadata["fixed_ms"]  # what the bench parses is kept
    # a disturbed step timing (1300 / 900) counts in the spread that decides caching
    assert table.metadata["step_overhead_spread"] == pytest.approx(1300 / 900, abs=1e-3)
    assert auto.table_spread(table) == pytest.approx(1300 / 900, abs=1e-3)
    off = auto.measure_table(
        TARGET,
        DRAFTER,
        device="cpu",
        dtype="float32",
        grid=AutoGrid(**{**grid.__dict__, "engine_overhead": False}),
        progress=False,
    )
    assert off.fixed_ms == pytest.approx([0.5, 0.7]) and "step_overhead_spread" not in off.metadata


def test_the_engine_step_is_timed_at_a_width_the_grid_and_the_tree_hold():
    assert auto.overhead_width(AutoGrid()) == 8
    assert auto.overhead_width(AutoGrid(widths=(1, 2, 4, 6, 16), draft_steps=2, draft_topk=2)) == 6
    assert auto.overhead_width(AutoGrid(widths=(1, 2, 3), draft_steps=1, draft_topk=1)) == 2
    assert auto.overhead_width(AutoGrid(widths=(16, 32))) == 16


def test_engine_step_samples_time_the_real_engine_at_each_batch_size():
    grid = AutoGrid(batch_sizes=(1, 2), widths=(1, 2, 4), context_len=12, draft_steps=2, draft_topk=2)
    from evict.engine.pricing import engine_step_samples

    out = engine_step_samples(TARGET, DRAFTER, device="cpu", dtype="float32", grid=grid, width=4)
    assert set(out) == {1, 2} and all(len(v) == 3 and min(v) > 0 for v in out.values())
