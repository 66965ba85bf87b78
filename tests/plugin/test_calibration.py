"""Start-up calibration (pure: a fake graph runner, a fake clock and a fake TP group; no sglang, no GPU)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
import torch.distributed as dist

from evict.plugin.calibration import (
    CalibrationKey,
    GraphReplay,
    calibrate,
    calibrate_or_load,
    calibration_key,
    default_batch_sizes,
    tp_max_reduce,
)
from evict.profiler.table import CostTable

WIDTHS = (2, 4, 8)
BATCH_SIZES = (1, 4)
# Per-repeat multipliers: median 1.1, mean 11.2 (an outlier), p10 < median < p90.
SPREAD = [1.0, 3.0, 0.9, 1.1, 50.0]


class FakeGraphs:
    """Records replays; each replay 'takes' base(kind, width, bs) x the multiplier of its repeat."""

    def __init__(self, scale: dict[str, float] | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.last_ms = 0.0
        self.count: dict[tuple[str, int, int], int] = {}
        self.scale = scale or {}

    @staticmethod
    def base(kind: str, width: int, bs: int) -> float:
        return {"draft": 2.0 + 0.5 * bs, "verify": 5.0 + width * bs, "extend": 1.0 + 0.25 * width * bs}[kind]

    def _run(self, kind: str, width: int, bs: int) -> None:
        self.calls.append((kind, width, bs))
        n = self.count.get((kind, width, bs), 0)
        self.count[(kind, width, bs)] = n + 1
        mult = SPREAD[n % len(SPREAD)]
        self.last_ms = self.base(kind, width, bs) * mult * self.scale.get(f"{kind}:{width}", 1.0)

    def replay(self) -> GraphReplay:
        return GraphReplay(
            draft=lambda bs: self._run("draft", 0, bs),
            verify=lambda w, bs: self._run("verify", w, bs),
            draft_extend=lambda w, bs: self._run("extend", w, bs),
        )

    def timer(self, fn) -> float:
        """The fake clock: the duration of the replay ``fn`` just ran."""
        fn()
        return self.last_ms


META = {"model_id": "org/tiny-moe", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "tp_size": 1}


def _key(**change) -> CalibrationKey:
    fields = dict(
        model_id="org/tiny-moe",
        config_hash="abcdef0123456789",
        device="NVIDIA H100 80GB HBM3",
        tp_size=1,
        dtype="bfloat16",
        widths=WIDTHS,
        batch_sizes=BATCH_SIZES,
        draft_steps=5,
        draft_topk=8,
        evict_version="0.1.0",
    )
    fields.update(change)
    return CalibrationKey(**fields)


def test_table_has_the_grid_and_holds_medians_of_draft_verify_and_extend():
    g = FakeGraphs()
    table = calibrate(
        g.replay(), widths=WIDTHS, batch_sizes=BATCH_SIZES, metadata=META, timer=g.timer, repeats=5, warmup=2
    )
    assert table.widths == list(WIDTHS) and table.batch_sizes == list(BATCH_SIZES)
    for i, bs in enumerate(BATCH_SIZES):
        assert table.fixed_ms[i] == pytest.approx(1.1 * g.base("draft", 0, bs), abs=1e-3)  # the median
        for j, w in enumerate(WIDTHS):
            want = 1.1 * (g.base("verify", w, bs) + g.base("extend", w, bs))
            assert table.median[i][j] == pytest.approx(want, abs=1e-3)
            assert table.p10[i][j] < table.median[i][j] < table.p90[i][j]
            # step time = draft + verify(m) + draft-extend(m)
            step = float(table.step_cost(bs, [w])[0])
            assert step == pytest.approx(1.1 * (g.base("draft", 0, bs) + g.base("verify", w, bs) + g.base("extend", w, bs)), rel=1e-4)  # fmt: skip
    parts = table.extra["calibration"]
    assert parts["verify_ms"]["median"][1][2] == pytest.approx(1.1 * g.base("verify", 8, 4), abs=1e-3)
    # every point: 2 warm-up replays + 5 timed ones, of each graph
    assert g.count[("verify", 8, 4)] == 7 and g.count[("draft", 0, 1)] == 7
    assert table.metadata["backend"] == "sglang-calibration" and table.metadata["repeats"] == 5
    CostTable.from_dict(json.loads(json.dumps(table.to_dict())))  # a valid JSON table


def test_bad_grids_are_refused():
    g = FakeGraphs()
    with pytest.raises(ValueError, match="widths and batch sizes"):
        calibrate(g.replay(), widths=[], batch_sizes=[1], metadata=META, timer=g.timer)
    with pytest.raises(ValueError, match="repeats"):
        calibrate(g.replay(), widths=[2], batch_sizes=[1], metadata=META, timer=g.timer, repeats=0)


def test_cache_key_names_everything_the_table_depends_on(tmp_path, monkeypatch):
    monkeypatch.setenv("EVICT_CACHE_DIR", str(tmp_path))
    key = _key()
    assert key.path().parent == tmp_path / "calibration"
    assert key.path().name == f"org_tiny-moe-tp1-{key.digest()}.json"
    for change in (
        {"config_hash": "0000000000000000"},
        {"device": "NVIDIA A100-SXM4-80GB"},
        {"tp_size": 2},
        {"dtype": "float16"},
        {"widths": (2, 4, 8, 16)},
        {"batch_sizes": (1, 8)},
        {"draft_steps": 4},
        {"evict_version": "0.2.0"},
    ):
        assert _key(**change).digest() != key.digest(), change


def test_calibrates_once_then_reuses_the_cache_and_recalibrates_on_request(tmp_path):
    lines: list[str] = []
    g = FakeGraphs()
    kw = dict(key=_key(), timer=g.timer, repeats=5, warmup=1, cache_folder=tmp_path, log=lines.append)
    first = calibrate_or_load(g.replay(), **kw)
    path = _key().path(tmp_path)
    assert path.is_file() and g.calls
    assert "calibrated 3 widths x 2 batch sizes" in lines[-1] and " s; cached at " in lines[-1]
    assert CostTable.load(path).metadata["calibration_s"] >= 0
    g2 = FakeGraphs()
    again = calibrate_or_load(g2.replay(), **{**kw, "timer": g2.timer})
    assert not g2.calls  # nothing replayed: the cached table is used
    assert again.median == first.median and "cached at" in lines[-1]
    g3 = FakeGraphs(scale={"verify:8": 2.0})
    fresh = calibrate_or_load(g3.replay(), **{**kw, "timer": g3.timer}, recalibrate=True)
    assert g3.calls and fresh.median[0][2] > first.median[0][2]  # measured again (EVICT_RECALIBRATE=1)
    assert CostTable.load(path).median == fresh.median


@pytest.mark.parametrize("damage", ["not json", "other widths", "other gpu"])
def test_a_bad_cache_file_is_ignored_with_a_warning(tmp_path, caplog, damage):
    g = FakeGraphs()
    kw = dict(key=_key(), timer=g.timer, repeats=3, warmup=0, cache_folder=tmp_path, log=lambda s: None)
    calibrate_or_load(g.replay(), **kw)
    path = _key().path(tmp_path)
    d = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{")
    elif damage == "other widths":
        d["widths"] = [2, 4, 16]
        path.write_text(json.dumps(d))
    else:
        d["metadata"]["device"] = "NVIDIA A100"
        path.write_text(json.dumps(d))
    g.calls.clear()
    with caplog.at_level(logging.WARNING, logger="evict.plugin.calibration"):
        table = calibrate_or_load(g.replay(), **kw)
    assert g.calls and "ignoring the cached calibration" in caplog.text
    assert table.widths == list(WIDTHS) and CostTable.load(path).widths == list(WIDTHS)


class FakeGroup:
    """A process group of threads: all_reduce really waits for every rank and combines them."""

    device = "cpu"

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.ops: list = []

    def all_reduce_for(self, rank: int):
        def all_reduce(t: torch.Tensor, op, group) -> None:
            assert group is self
            self.ops.append(op)
            self.slots[rank] = t.clone()
            self.barrier.wait()
            result = torch.stack(self.slots).amax(0)
            self.barrier.wait()
            t.copy_(result)

        return all_reduce


def test_tp_reduction_gives_every_rank_the_identical_max_table(tmp_path):
    """Rank 1 is slow on width 8, rank 2 on drafting; rank 0 alone has a cached table. Every rank
    calibrates (the cache decision is reduced too) and ends with the element-wise max."""
    size = 3
    group = FakeGroup(size)
    scales = [{}, {"verify:8": 3.0}, {"draft:0": 2.0}]
    key = _key(tp_size=size)
    folders = [tmp_path / f"rank{r}" for r in range(size)]
    seeded = FakeGraphs()
    calibrate_or_load(
        seeded.replay(), key=key, timer=seeded.timer, repeats=5, warmup=0, cache_folder=folders[0], log=print
    )
    tables: list[CostTable | None] = [None] * size
    graphs = [FakeGraphs(scale=scales[r]) for r in range(size)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            tables[rank] = calibrate_or_load(
                graphs[rank].replay(),
                key=key,
                timer=graphs[rank].timer,
                reduce=tp_max_reduce(group, all_reduce=group.all_reduce_for(rank)),
                repeats=5,
                warmup=0,
                write_cache=rank == 0,
                cache_folder=folders[rank],
                log=lambda s: None,
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(g.calls for g in graphs)  # rank 0 calibrated too, though it had a cache
    assert all(op == dist.ReduceOp.MAX for op in group.ops)
    dicts = [t.to_dict() for t in tables]
    for d in dicts:
        d["metadata"].pop("date"), d["metadata"].pop("calibration_s")
    assert dicts[0] == dicts[1] == dicts[2]
    t0 = tables[0]
    j8 = t0.widths.index(8)
    base = FakeGraphs.base
    assert t0.median[0][j8] == pytest.approx(
        1.1 * (3.0 * base("verify", 8, 1) + base("extend", 8, 1)), abs=1e-3
    )
    assert t0.fixed_ms[1] == pytest.approx(1.1 * 2.0 * base("draft", 0, 4), abs=1e-3)
    assert t0.median[0][0] == pytest.approx(1.1 * (base("verify", 2, 1) + base("extend", 2, 1)), abs=1e-3)
    assert not key.path(folders[1]).exists()  # only rank 0 writes


def test_default_batch_sizes_spread_over_the_captured_ones():
    assert default_batch_sizes([1, 2, 4]) == (1, 2, 4)
    caps = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160]
    picked = default_batch_sizes(caps)
    assert picked[0] == 1 and picked[-1] == 160 and len(picked) == 6 and set(picked) <= set(caps)
    with pytest.raises(ValueError, match="capture"):
        default_batch_sizes([])


def test_calibration_key_from_what_the_worker_knows(tmp_path):
    from evict.profiler.table import model_config_hash

    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2}
    model = tmp_path / "Qwen3-Tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    key = calibration_key(
        model_path=str(model) + "/",
        revision=None,
        gpu_name="NVIDIA H100 80GB HBM3",
        tp_size=2,
        dtype="torch.bfloat16",
        widths=[8, 2, 4, 8],
        batch_sizes=[4, 1],
        draft_steps=5,
        draft_topk=8,
    )
    assert key.model_id == "Qwen3-Tiny" and key.config_hash == model_config_hash(cfg)
    assert (key.dtype, key.widths, key.batch_sizes, key.tp_size) == ("bfloat16", (2, 4, 8), (1, 4), 2)
    assert key.path(tmp_path).name.startswith("Qwen3-Tiny-tp2-")
