"""Live step costs wired into the EVICT worker, and calibration replays on realistic inputs.

Pure CPU: fake workers (as in ``test_plugin_worker.py``), a fake clock and fake graph runners whose
replay cost depends on the tokens in their input buffers, as a MoE's does (distinct tokens route
to distinct experts). No GPU, no server.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from test_plugin_worker import _fake_evict_worker, _Recorder, make_batch, make_draft_worker  # noqa: E402

from evict.plugin import worker as evict_worker  # noqa: E402
from evict.plugin.calibration import GraphReplay, calibrate, realistic_graph_replay  # noqa: E402
from evict.plugin.config import parse_env  # noqa: E402
from evict.plugin.live_costs import LiveCosts, StepSample, StepTimer, host_marks  # noqa: E402
from evict.plugin.metrics import format_stats  # noqa: E402
from evict.plugin.tree_cut import ScoreSink  # noqa: E402
from evict.profiler.table import CostTable  # noqa: E402
from evict.truncation import TruncationPolicy  # noqa: E402

pytestmark = pytest.mark.sglang


def _table(widths, grid) -> CostTable:
    return CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "m", "device": "cpu:x", "dtype": "float32", "tp_size": 1},
            "batch_sizes": [1, 4],
            "widths": list(widths),
            "latency_ms": {"median": grid, "p10": grid, "p90": grid},
        }
    )


def test_without_a_prior_the_draft_worker_times_each_width_before_the_rule_decides(monkeypatch):
    rec = _Recorder()
    # the rule alone would always take width 2 (the steep cost); exploration overrides it
    policy = TruncationPolicy([1.0, 5.0, 50.0], widths=[2, 4, 8], decision="immediate")
    dw = make_draft_worker(monkeypatch, rec, policy)
    dw.live_costs = LiveCosts((2, 4, 8), (1, 2, 4, 8), prior=None, min_obs=1)
    chosen = []
    for _ in range(4):
        dw.draft(make_batch(bs=2))
        m = dw.last_decision.width
        chosen.append(m)
        dw.live_costs.observe(StepSample(2, m, 10.0 * m, float("nan")))
    assert chosen[:3] == [2, 4, 8]  # least timed width first
    assert dw.live_costs.explore_index(2) is None
    assert policy.counters.steps == 4  # explored steps are counted like decided ones


def _live_worker(monkeypatch, tmp_path, prior):
    monkeypatch.setenv("EVICT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(evict_worker, "get_parallel", lambda: SimpleNamespace(tp_size=1, tp_rank=0))
    w = _fake_evict_worker()
    w._draft_worker.score_sink = ScoreSink(rows=4, cols=7, device="cpu")
    w.evict_config = parse_env({"EVICT_CACHE_DIR": str(tmp_path)})
    w.server_args = SimpleNamespace(model_path=str(tmp_path / "model"), revision=None)
    w.speculative_num_steps, w.topk, w.gpu_id, w.device = 3, 4, 0, "cpu"
    w._target_worker.model_runner.model_config = SimpleNamespace(dtype=torch.float32)
    w.cost_prior = prior
    return w


def test_served_steps_move_the_table_the_policy_reads(monkeypatch, tmp_path):
    """A 10x-wrong EVICT_COST_TABLE: after a few dozen timed steps the policy prices measured time."""
    real = {4: 30.0, 8: 50.0}  # ms per step at bs 1
    wrong = _table([4, 8], [[3.0, 4.0], [6.0, 8.0]])
    w = _live_worker(monkeypatch, tmp_path, wrong)
    policy = w._start_live_costs(TruncationPolicy(wrong, widths=[4, 8]))
    before = policy.step_cost(1, "cpu").tolist()  # cached now: the server precomputes these
    assert before == pytest.approx([3.0, 4.0])
    clock = [0.0]
    w.step_timer = StepTimer(host_marks(lambda: clock[0]))
    for step in range(64):
        width = (4, 8)[step % 2]
        w.step_timer.begin()
        clock[0] += real[width] / 1000
        w.speculative_num_draft_tokens = width
        w._after_timed_step(1)
        clock[0] += 0.0005
    after = policy.step_cost(1, "cpu").tolist()  # the same cached tensor, refreshed in place
    assert after == pytest.approx([30.5, 50.5], rel=1e-3)
    # bs 4 never served: its prior scaled by the ratio observed at bs 1 (median of 30.5/3, 50.5/4)
    ratio = (30.5 / 3 + 50.5 / 4) / 2
    assert policy.step_cost(4, "cpu").tolist() == pytest.approx([6 * ratio, 8 * ratio], rel=1e-3)
    pred, meas, ratio, n = w.live_costs.take_interval()
    assert n == 63 and meas == pytest.approx((32 * 30.5 + 31 * 50.5) / 63)
    line = format_stats(policy.stats(), step_ms=(pred, meas, ratio, n))
    assert "step_ms predicted=" in line and f"measured={meas:.2f}" in line
    # the measured table is cached under the calibration key scheme for the next start
    cached = list(tmp_path.glob("calibration/*.json"))
    assert cached and CostTable.load(cached[0]).metadata["backend"] == "sglang-live"


def test_a_cached_live_table_is_the_next_starts_prior(monkeypatch, tmp_path):
    w = _live_worker(monkeypatch, tmp_path, _table([4, 8], [[3.0, 4.0], [6.0, 8.0]]))
    w._start_live_costs(TruncationPolicy([1.0, 1.0], widths=[4, 8]))
    for _ in range(3):
        w.live_costs.observe(StepSample(1, 4, 20.0, 3.0))
        w.live_costs.observe(StepSample(1, 8, 40.0, 4.0))
    w.live_costs.publish()
    w._refresh_live_costs()
    again = _live_worker(monkeypatch, tmp_path, None)  # no table, no graphs: the cache, not exploration
    policy = again._start_live_costs(TruncationPolicy([1.0, 1.0], widths=[4, 8]))
    assert not again.live_costs.exploring
    assert policy.step_cost(1, "cpu").tolist() == pytest.approx([20.0, 40.0])


# -- calibration replays on realistic inputs ------------------------------------------------------


class TokenRoutedRunner:
    """A captured graph whose replay cost grows with the distinct experts its tokens route to."""

    def __init__(self, width: int, max_bs: int = 8, experts: int = 64) -> None:
        self.width, self.experts = width, experts
        self.buffers = SimpleNamespace(
            input_ids=torch.zeros(max_bs * max(width, 1), dtype=torch.int64),  # capture-time: token 0
            positions=torch.zeros(max_bs * max(width, 1), dtype=torch.int64),
        )

    def cost(self, bs: int) -> float:
        ids = self.buffers.input_ids[: bs * self.width]
        return 1.0 + 0.5 * len(set((ids % self.experts).tolist()))


_LAST = [0.0]  # the fake clock: the cost of the replay that just ran


def _replay_one(runner, bs):
    _LAST[0] = runner.cost(bs)


def _calibrated_verify(replay: GraphReplay, widths) -> list[float]:
    """verify(m) medians at bs 4 from :func:`calibrate` (the start-up calibration itself)."""
    table = calibrate(
        replay,
        widths=sorted(widths),
        batch_sizes=[4],
        metadata={"model_id": "m", "device": "d", "dtype": "float32", "tp_size": 1},
        timer=lambda fn: (fn(), _LAST[0])[1],
        repeats=3,
        warmup=0,
    )
    return table.extra["calibration"]["verify_ms"]["median"][0]


def _assert_verify_grows_with_width(verify: list[float]) -> None:
    assert verify[-1] > 2 * verify[0], f"verify(m) is flat in m: {verify}"


def _runners():
    verify = {m: TokenRoutedRunner(m) for m in (2, 4, 8)}
    extend = {m: TokenRoutedRunner(m) for m in (2, 4, 8)}
    return verify, extend, TokenRoutedRunner(1)


def test_calibration_replays_load_varied_tokens_so_verify_grows_with_width():
    verify, extend, draft = _runners()
    replay = realistic_graph_replay(
        _replay_one, draft_runner=draft, verify_runners=verify, extend_runners=extend, vocab_size=5000
    )
    _assert_verify_grows_with_width(_calibrated_verify(replay, verify))
    assert int(verify[8].buffers.positions[0]) == 256  # a traffic-like context, not position 0
    assert len(set(verify[8].buffers.input_ids[:32].tolist())) > 16


def test_a_bare_replay_on_capture_time_inputs_fails_the_same_check():
    """What SGLang's buffers hold at start-up (token 0 everywhere): verify(m) comes out flat."""
    verify, extend, draft = _runners()
    bare = GraphReplay(
        draft=lambda bs: _replay_one(draft, bs),
        verify=lambda w, bs: _replay_one(verify[w], bs),
        draft_extend=lambda w, bs: _replay_one(extend[w], bs),
    )
    with pytest.raises(AssertionError, match="flat"):
        _assert_verify_grows_with_width(_calibrated_verify(bare, verify))


@pytest.mark.parametrize(
    ("env", "deterministic", "on"),
    [
        ({}, False, True),
        ({}, True, False),
        ({"EVICT_LIVE_COSTS": "1"}, True, True),
        ({"EVICT_LIVE_COSTS": "0"}, False, False),
    ],
)
def test_live_costs_default_off_only_under_deterministic_inference(env, deterministic, on):
    """Widths that follow measured time would change a seeded sample's tree, so the same seed would
    not repeat: under --enable-deterministic-inference the start-up table stays fixed unless asked."""
    w = object.__new__(evict_worker.EvictWorkerV2)
    w.evict_config = parse_env(env)
    w.server_args = SimpleNamespace(enable_deterministic_inference=deterministic)
    assert w._live_costs_on() is on


def _depth_pricing_worker(table: CostTable | None, widths=(1, 2, 4, 8)):
    """An EVICT worker (S=3, topk 4, N=8) offering plain decoding, the chain of 3 and tree depths
    1..3 (the order ``_start_depth`` lists them in), priced by ``table``."""
    from evict.truncation.depth import DepthController, DraftShape

    w = object.__new__(evict_worker.EvictWorkerV2)
    w.full_num_draft_tokens, w.full_num_steps, w.speculative_num_steps, w.topk = 8, 3, 3, 4
    w.cost_prior, w.plain_costs = table, None
    w.truncation_policy = TruncationPolicy(lambda bs, ws: 10.0 + ws.float(), widths=list(widths))
    shapes = [DraftShape(4, 0), DraftShape(1, 3), *(DraftShape(4, d) for d in (1, 2, 3))]
    w.depth_states = {
        sh: evict_worker.DraftDepthState(
            sh.depth,
            w._depth_width(sh.depth, tuple(widths), sh.topk),
            None,
            None,
        )
        for sh in shapes[1:-1]
    }
    w.depth = DepthController(shapes, list(widths), w._depth_costs, probe_budget=0.0)
    return w


def test_a_shallower_depth_costs_the_full_step_less_the_drafting_it_skips():
    # no table pricing drafting: the full tree's width-1 step (11 ms) is plain decoding's (11 ms,
    # an upper bound without a table) plus drafting 0 ms, so nothing is skipped
    from evict.truncation.depth import DraftShape

    w = _depth_pricing_worker(None)
    assert {str(sh): st.num_draft_tokens for sh, st in w.depth_states.items()} == {
        "chain(3,1)": 4,
        "tree(1,4)": 4,
        "tree(2,4)": 8,
    }
    row = {str(sh): i for i, sh in enumerate(w.depth.shapes)}
    cost = w._depth_costs(1)
    full = torch.tensor([11.0, 12.0, 14.0, 18.0], dtype=torch.float64)
    assert torch.equal(cost[-1], full) and torch.equal(cost[0], torch.full_like(full, 11.0))
    for name in ("tree(1,4)", "chain(3,1)"):  # both fill width 4 at most
        assert torch.equal(cost[row[name]][:3], full[:3]) and math.isinf(cost[row[name]][3]), name
    # a table pricing drafting per depth: plain = the step less all drafting; depth d skips the
    # table's share of it (drafting 1 step costs 1 ms, 2 steps 3 ms, 3 steps 6 ms; extend 0.5 ms)
    table = CostTable.from_dict(
        {
            "schema_version": 1,
            "metadata": {"model_id": "m", "device": "cpu:x", "dtype": "float32", "tp_size": 1,
                         "draft_steps": 3, "draft_topk": 4},
            "batch_sizes": [1, 4],
            "widths": [1, 2, 4, 8],
            "latency_ms": {k: [[10.0, 11.0, 13.0, 17.0]] * 2 for k in ("median", "p10", "p90")},
            "fixed_ms": [6.0, 6.0],
            # the chain of 3 drafts one row per request: 2 ms against the tree's 6
            "draft_ms": {"4": [[0.5, 1.0, 3.0, 6.0]] * 2, "1": [[0.5, 0.8, 1.3, 2.0]] * 2},
        }
    )  # fmt: skip
    w = _depth_pricing_worker(table)
    w.truncation_policy = TruncationPolicy(table, widths=[1, 2, 4, 8])
    cost = w._depth_costs(1)
    full = torch.tensor([16.0, 17.0, 19.0, 23.0], dtype=torch.float64)
    plain = 16.0 - 6.0 + 0.5
    assert torch.allclose(cost[-1], full) and torch.allclose(cost[0], torch.full_like(full, plain))
    drafting = 16.0 - plain  # 5.5 ms: the full tree's width-1 step less a plain step
    for shape, share in (
        (DraftShape(4, 1), (6.0 - 1.0) / 5.5),
        (DraftShape(4, 2), (6.0 - 3.0) / 5.5),
        (DraftShape(1, 3), (6.0 - 2.0) / 5.5),
    ):
        i = w.depth.index[shape]
        row = (full - drafting * share).clamp(min=plain)
        n_d = w.depth_states[shape].num_draft_tokens
        want = torch.where(torch.tensor([1, 2, 4, 8]) > n_d, torch.tensor(math.inf, dtype=torch.float64), row)
        assert torch.allclose(cost[i], want), (shape, cost[i], want)
    # what the controller compares is corrected by each shape's measured steps
    i = w.depth.index[DraftShape(4, 1)]
    w.depth.record_step(w.depth.shapes[i], 1, float(cost[i, 2]), 2.0 * float(cost[i, 2]))
    assert torch.allclose(w.depth.priced(1)[i], 2.0 * cost[i])


def test_each_served_shape_is_corrected_by_its_own_timed_steps(monkeypatch, tmp_path):
    """EVICT_DEPTH=1: full-tree steps priced right and depth-1 steps priced at twice their time. The
    depth's correction is its own (0.5), and the full tree's stays near 1: its timed steps count
    too, so it never falls back on the depth's ratio."""
    from evict.truncation.depth import DepthController, DraftShape

    real = {8: 50.0}
    table = _table([4, 8], [[30.0, 50.0], [60.0, 100.0]])
    w = _live_worker(monkeypatch, tmp_path, table)
    w.truncation_policy = w._start_live_costs(TruncationPolicy(table, widths=[4, 8]))
    shapes = [DraftShape(4, 0), DraftShape(4, 1), DraftShape(4, 3)]
    w.depth = DepthController(shapes, [4, 8], lambda bs: torch.ones(3, 2), probe_budget=0.0)
    w.depth_states = {shapes[1]: evict_worker.DraftDepthState(1, 4, None, None)}
    w.plain_costs, w._plain_step = None, False
    w._draft_worker._host_widths = lambda policy: tuple(int(v) for v in policy.widths.tolist())
    clock = [0.0]
    w.step_timer = StepTimer(host_marks(lambda: clock[0]))
    for step in range(40):
        shallow = step % 2 == 1
        w._step_shape = shapes[1] if shallow else shapes[2]
        w._depth_prices = torch.tensor([40.0, math.inf], dtype=torch.float64)
        w.speculative_num_draft_tokens = 4 if shallow else 8
        w.step_timer.begin()
        clock[0] += (20.0 if shallow else real[8]) / 1000
        w._after_timed_step(1)
    factors = w.depth.cost_factors(1).tolist()
    assert factors[1] == pytest.approx(0.5, rel=0.01)
    assert factors[2] == pytest.approx(1.0, rel=0.01)


def test_a_step_priced_before_its_cell_was_timed_sets_no_correction(monkeypatch, tmp_path):
    """Without a table the plain step is first timed against a 1 ms placeholder, and the full tree
    at batch size 4 against batch size 1's cost. Those steps carry no prediction, so neither moves
    the shapes' corrections: the plain step's stays near 1 after a few measured steps (it was
    pinned at 10x, so the server kept judging plain decoding 10x dearer than it is)."""
    from evict.truncation.depth import DepthController, DraftShape

    table = _table([4, 8], [[30.0, 50.0], [60.0, 100.0]])
    w = _live_worker(monkeypatch, tmp_path, table)
    w.truncation_policy = w._start_live_costs(TruncationPolicy(table, widths=[4, 8]))
    w.live_costs = LiveCosts((4, 8), (1, 4), prior=None, min_obs=2, sync_every=1)
    shapes = [DraftShape(4, 0), DraftShape(4, 3)]
    w.depth = DepthController(shapes, [4, 8], lambda bs: torch.ones(2, 2), probe_budget=0.0)
    w.depth_states = {}
    w.plain_costs = LiveCosts((1,), (1, 4), None, min_obs=2, sync_every=1)
    w.speculative_num_draft_tokens = 8
    clock = [0.0]
    w.step_timer = StepTimer(host_marks(lambda: clock[0]))
    real = {(1, 0): 34.0, (1, 8): 75.0, (4, 0): 62.0, (4, 8): 150.0}
    # per batch size: the plain step timed twice, the tree twice, then two more of each
    for bs in (1, 4):
        for plain in (True, True, False, False, True, False, True, False):
            w._plain_step, w._step_shape = plain, shapes[0] if plain else shapes[1]
            w.step_timer.begin()
            clock[0] += real[(bs, 0 if plain else 8)] / 1000
            w._after_timed_step(bs)
        w.step_timer.interrupt()  # a prefill between the batch sizes
    for bs in (1, 4):
        factors = w.depth.cost_factors(bs).tolist()
        assert factors == pytest.approx([1.0, 1.0], rel=0.02), (bs, factors)
