"""The whole-step decision (issue 20): draft shape and width from one argmax, priced per depth.

Brute force for the pure rule, the cost table's per-depth drafting costs, the controller's
warm-up / decision / probing, and the engine: greedy output identical to target-only decoding
while the depth really moves (up, down, to plain decoding, chain and tree), and SGLang's adaptive
protocol driving a chain.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from engine_fixtures import greedy_reference, oracle_pair, random_pair

from evict.engine import SpecEngine
from evict.profiler.table import CostTable, CostTableError
from evict.truncation import AcceptanceEstimator, TruncationPolicy
from evict.truncation.depth import (
    POPULATION_RATE,
    DepthController,
    DraftShape,
    choose_step,
    depth_profile,
    shape_grid,
    shape_values,
)
from evict.truncation.tree import num_candidates

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 3, 3]]
NEW = 14
WIDTHS = [1, 2, 4, 8, 16]


def table_dict(draft_tree=(4, 2), verify=(1.0, 1.35, 1.8, 2.6, 4.0), draft=None, fixed=None):
    steps, topk = draft_tree
    draft = draft or {
        topk: [0.2 + 0.5 * d for d in range(steps + 1)],
        1: [0.2 + 0.2 * d for d in range(steps + 1)],
    }
    own = draft[topk][steps]
    rows = [[v * f for v in verify] for f in (1.0, 3.0)]
    return {
        "schema_version": 1,
        "metadata": {
            "model_id": "tiny",
            "device": "cpu",
            "dtype": "float32",
            "tp_size": 1,
            "draft_steps": steps,
            "draft_topk": topk,
        },
        "batch_sizes": [1, 8],
        "widths": list(WIDTHS),
        "latency_ms": {"median": rows, "p10": rows, "p90": rows},
        "fixed_ms": fixed or [own + 0.3, 3 * own + 0.3],
        "draft_ms": {str(k): [list(v), [3 * x for x in v]] for k, v in draft.items()},
    }


# ------------------------------------------------------------------------------------ pure rule


def brute_force(profile, counts, cost, widths):
    best, arg = -math.inf, None
    for i, k in enumerate(counts):
        for j, w in enumerate(widths):
            c = float(cost[i, j])
            if not (math.isfinite(c) and c > 0):
                continue
            m = min(w, k + 1)
            v = (1.0 + float(profile[i, : m - 1].double().sum())) / c
            if v > best + 1e-12:
                best, arg = v, (i, j)
    return arg


def test_choose_step_is_the_global_argmax_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        shapes = rng.randint(1, 6)
        counts = [rng.choice([0, 1, 2, 4, 6, 10, 21]) for _ in range(shapes)]
        kmax = max(max(counts), 1)
        profile = torch.zeros(shapes, kmax)
        for i, k in enumerate(counts):
            profile[i, :k] = torch.rand(k).sort(descending=True).values * rng.random()
        widths = sorted(rng.sample([1, 2, 3, 4, 8, 16, 32], rng.randint(1, 5)))
        cost = torch.rand(shapes, len(widths)) * 5 + 0.1
        if trial % 7 == 0:
            cost[rng.randrange(shapes), rng.randrange(len(widths))] = float("nan")
        got = choose_step(profile, counts, cost, widths)
        want = brute_force(profile, counts, cost, widths)
        v = shape_values(profile, counts, cost.nan_to_num(nan=1e9), widths)
        assert got == want or math.isclose(float(v[got]), float(v[want]), rel_tol=1e-9), (trial, got, want)


def test_flat_drafting_and_verify_costs_pick_the_deepest_widest_and_steep_ones_plain():
    shapes = shape_grid({4: 3})
    counts = [s.candidates for s in shapes]
    profile = torch.zeros(len(shapes), max(counts))
    for i, k in enumerate(counts):
        profile[i, :k] = 0.5
    flat = torch.ones(len(shapes), 3)
    assert choose_step(profile, counts, flat, [1, 8, 64]) == (len(shapes) - 1, 2)
    steep = torch.tensor([[1.0, 9.0, 90.0]] + [[1.0 + 50 * d, 9.0, 90.0] for d in range(1, 4)])
    assert choose_step(profile, counts, steep, [1, 8, 64]) == (0, 0)
    none = torch.full((len(shapes), 3), float("nan"))
    assert choose_step(profile, counts, none, [1, 8, 64]) == (len(shapes) - 1, 2)


def test_depth_profile_is_the_mean_sorted_scores_per_depth_cap():
    topk, depth = 2, 3
    k = num_candidates(depth, topk)
    scores = torch.rand(5, k)
    scores[0, 3] = float("nan")
    prof = depth_profile(scores, topk, depth)
    clean = scores.nan_to_num(0.0)
    for d in range(1, depth + 1):
        kd = num_candidates(d, topk)
        want = clean[:, :kd].sort(dim=1, descending=True).values.mean(0)
        assert torch.allclose(prof[d - 1, :kd], want)
        assert bool((prof[d - 1, kd:] == 0).all())
    with pytest.raises(ValueError, match="candidates"):
        depth_profile(scores[:, :-1], topk, depth)


def test_shapes_validate_and_grid_lists_plain_then_each_family():
    assert [str(s) for s in shape_grid({4: 2, 1: 2})] == [
        "plain",
        "tree(1,4)",
        "tree(2,4)",
        "chain(1,1)",
        "chain(2,1)",
    ]
    assert DraftShape(4, 0).max_width == 1 and DraftShape(1, 3).candidates == 3
    with pytest.raises(ValueError, match="depth"):
        DraftShape(4, -1)
    with pytest.raises(ValueError, match="at least one draft topk"):
        shape_grid({})  # names no family


# ------------------------------------------------------------------------------------ cost table


def test_table_prices_each_shape_by_swapping_its_drafting_cost():
    table = CostTable.from_dict(table_dict())
    assert table.draft_shapes == {2: 4, 1: 4}
    full = table.step_cost(1, WIDTHS)
    own = table.draft_cost(1, 2, 4)
    for topk, depth in ((2, 4), (2, 2), (1, 3), (2, 0)):
        got = table.shape_cost(1, WIDTHS, topk, depth)
        cap = 1 + num_candidates(depth, topk)
        want = table.step_cost(1, [min(w, cap) for w in WIDTHS]) - own + table.draft_cost(1, topk, depth)
        assert torch.allclose(got, want)
    # the table's own tree costs its own step (width 16 is beyond its 14 candidates: verified as 15)
    assert torch.allclose(table.shape_cost(1, WIDTHS, 2, 4)[:4], full[:4])
    # interpolated in batch size like the verify grid
    assert table.draft_cost(4.5, 2, 1) == pytest.approx((0.7 + 2.1) / 2)
    again = CostTable.from_dict(table.to_dict())
    assert again.draft_ms == table.draft_ms
    assert table.scaled(2.0).draft_cost(1, 1, 2) == pytest.approx(2 * table.draft_cost(1, 1, 2))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["draft_ms"].pop("2"), "own tree"),
        (lambda d: d["draft_ms"]["1"][0].append(1.0), "ragged"),
        (lambda d: d["draft_ms"]["1"][1].__setitem__(0, -1.0), "non-negative"),
        (lambda d: d["draft_ms"].update({"x": [[0, 1], [0, 1]]}), "topk"),
        (lambda d: d["metadata"].pop("draft_steps"), "draft_steps"),
        (lambda d: d.update(draft_ms=[1, 2]), "object"),
    ],
)
def test_bad_draft_costs_are_refused_with_the_field(mutate, match):
    d = table_dict()
    mutate(d)
    with pytest.raises(CostTableError, match=match):
        CostTable.from_dict(d)


def test_a_shape_the_table_cannot_price_is_a_clear_error():
    table = CostTable.from_dict(table_dict())
    with pytest.raises(CostTableError, match="topk 3"):
        table.shape_cost(1, WIDTHS, 3, 1)
    with pytest.raises(CostTableError, match="depths 0..4"):
        table.shape_cost(1, WIDTHS, 2, 5)
    d = table_dict()
    d.pop("draft_ms")
    policy = TruncationPolicy(CostTable.from_dict(d), widths=WIDTHS)
    assert not policy.prices_shapes
    with pytest.raises(ValueError, match="draft_ms"):
        policy.shape_costs(1, shape_grid({2: 4}))


# ------------------------------------------------------------------------------------ controller


def controller(draft, verify=(1.0, 1.1, 1.2, 1.3, 1.4), families=None, **kw):
    table = CostTable.from_dict(table_dict(verify=verify, draft=draft))
    policy = TruncationPolicy(table, widths=WIDTHS)
    shapes = shape_grid(families or {2: 4})
    return DepthController(shapes, WIDTHS, lambda bs: policy.shape_costs(bs, shapes), **kw)


def test_controller_warms_up_deep_then_follows_the_scores():
    cheap = {2: [0.1, 0.11, 0.12, 0.13, 0.14]}
    ctl = controller(cheap)
    assert ctl.plan(1) == DraftShape(2, 4)  # warm-up: the family's deepest, once
    strong = torch.full((1, num_candidates(4, 2)), 0.9)
    ctl.observe(DraftShape(2, 4), strong)
    assert ctl.plan(1) == DraftShape(2, 4)
    weak = torch.full((1, num_candidates(4, 2)), 0.001)
    ctl2 = controller(cheap)
    ctl2.plan(1)
    ctl2.observe(DraftShape(2, 4), weak)
    assert ctl2.plan(1) == DraftShape(2, 0)  # nothing worth drafting: plain decoding


def test_controller_chooses_a_middle_depth_when_deep_nodes_are_weak():
    # depth-1 nodes likely, deeper ones hopeless; drafting each step costs as much as a verify
    ctl = controller({2: [0.05, 0.3, 1.3, 2.3, 3.3]}, verify=(1.0, 1.01, 1.02, 1.03, 1.04))
    ctl.plan(1)
    scores = torch.zeros(1, num_candidates(4, 2))
    scores[0, :2] = torch.tensor([0.9, 0.8])
    ctl.observe(DraftShape(2, 4), scores)
    assert ctl.plan(1) == DraftShape(2, 1)


def test_controller_probes_the_deepest_shape_with_back_off():
    ctl = controller({2: [0.1, 0.11, 0.12, 0.13, 0.14]}, probe_every=3, max_probe_every=12)
    weak = torch.full((1, num_candidates(4, 2)), 0.001)
    plans = []
    for _ in range(40):
        shape = ctl.plan(1)
        plans.append(shape.depth)
        if shape.depth:
            ctl.observe(shape, weak[:, : shape.candidates])
        else:
            ctl.observe(shape, weak[:, :0])
    probes = [i for i, d in enumerate(plans) if d == 4]
    assert probes[0] == 0 and len(probes) >= 3
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # the interval grows while nothing changes
    assert ctl.probes == len(probes) - 1  # the first one was the warm-up
    assert ctl.stats()["shapes"]["plain"] == 40 - len(probes)


def test_controller_refreshes_every_shallower_depth_from_one_tree_and_never_picks_unseen_shapes():
    ctl = controller({2: [0.1] * 5, 1: [0.1] * 5}, families={2: 4, 1: 4})
    assert ctl.plan(1) == DraftShape(2, 4)
    ctl.observe(DraftShape(2, 4), torch.full((1, num_candidates(4, 2)), 0.5))
    assert ctl.plan(1) == DraftShape(1, 4)  # the chain family warms up too
    ctl.observe(DraftShape(1, 2), torch.full((1, 2), 0.99))
    # chain depths 3-4 are still unseen: chosen only after their own observation
    assert ctl.decide(1) not in (DraftShape(1, 3), DraftShape(1, 4))


# ------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module", params=["random", "oracle"])
def pair_and_reference(request):
    target, drafter = random_pair(0) if request.param == "random" else oracle_pair(0)
    ref = [greedy_reference(target, p, NEW) for p in PROMPTS]
    return request.param, target, drafter, ref


class ScriptedDepth(DepthController):
    """Plans a fixed cycle of shapes (every transition the issue names) but prices and observes as usual."""

    def __init__(self, script, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = itertools.cycle(script)

    def plan(self, batch_size):
        return self._count(next(self.script))


def engine_with(target, drafter, depth_cls=DepthController, script=None, draft=None, depth_kw=None, **kw):
    depth_kw = depth_kw or {}
    table = CostTable.from_dict(table_dict(draft=draft))
    policy = TruncationPolicy(table, widths=WIDTHS, decision=kw.pop("decision", "immediate"))
    shapes = shape_grid({2: 4, 1: 4})
    args = (shapes, WIDTHS, lambda bs: policy.shape_costs(bs, shapes))
    depth = depth_cls(script, *args) if script is not None else depth_cls(*args, probe_every=2, **depth_kw)
    return SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy, depth=depth, **kw)


SCRIPT = [
    DraftShape(2, 4),
    DraftShape(2, 0),
    DraftShape(2, 1),
    DraftShape(1, 3),
    DraftShape(2, 2),
    DraftShape(2, 0),
    DraftShape(1, 1),
    DraftShape(2, 3),
]


@pytest.mark.parametrize("decision", ["immediate", "lagged"])
def test_scripted_depth_changes_stay_token_identical(pair_and_reference, decision):
    _, target, drafter, ref = pair_and_reference
    engine = engine_with(target, drafter, ScriptedDepth, SCRIPT, decision=decision)
    res = engine.generate(PROMPTS, NEW)
    assert res.tokens == ref
    seen = [(s.topk, s.depth) for s in res.steps]
    assert seen[: len(SCRIPT)] == [(s.topk, s.depth) for s in SCRIPT][: len(seen)]
    for s in res.steps:
        cap = 1 + num_candidates(s.depth, s.topk)
        assert 1 <= s.width <= cap
        if s.depth == 0:
            assert s.width == 1 and s.accepted == [1] * len(s.active)


def test_depth_controller_decides_and_stays_token_identical(pair_and_reference):
    kind, target, drafter, ref = pair_and_reference
    # costly drafting per depth: the controller has a real choice between shapes
    draft = {2: [0.1, 0.6, 1.1, 1.6, 2.1], 1: [0.1, 0.3, 0.5, 0.7, 0.9]}
    # calibrated scores: the random drafter is confident and wrong, which only outcomes reveal
    est = AcceptanceEstimator(topk=2, max_depth=4, prior_strength=2.0, half_life=64.0)
    # decide on the table's prices (this machine's timings of a toy model would overrule them)
    engine = engine_with(target, drafter, draft=draft, acceptance=est, depth_kw={"cost_window": 0})
    every = []
    for _ in range(3):
        res = engine.generate(PROMPTS, NEW)
        assert res.tokens == ref
        every += res.steps
    shapes = {(s.topk, s.depth) for s in every}
    if kind == "random":  # drafts mostly rejected: plain decoding must win most steps
        assert sum(s.depth == 0 for s in res.steps) > len(res.steps) / 2
    else:
        assert any(s.depth > 0 for s in res.steps)
    assert len(shapes) >= 2  # warm-up, probes and decisions really vary the shape
    assert all(s.predicted_step_ms is not None for s in every if s.depth)
    assert engine.depth.stats()["cost_factors"] == {}


def test_the_engine_corrects_each_drafted_shape_by_its_measured_steps(pair_and_reference):
    _, target, drafter, ref = pair_and_reference
    draft = {2: [0.1, 0.6, 1.1, 1.6, 2.1], 1: [0.1, 0.3, 0.5, 0.7, 0.9]}
    engine = engine_with(target, drafter, ScriptedDepth, SCRIPT, draft=draft)
    res = engine.generate(PROMPTS, NEW)
    assert res.tokens == ref
    factors = engine.depth.stats()["cost_factors"]
    drafted = {str(DraftShape(s.topk, s.depth)) for s in res.steps}
    assert factors and {k.split(":")[1] for k in factors} == drafted
    assert all(0.1 <= v <= 10.0 for v in factors.values())


def test_depth_needs_a_table_that_prices_drafting():
    target, drafter = random_pair(0)
    d = table_dict()
    d.pop("draft_ms")
    policy = TruncationPolicy(CostTable.from_dict(d), widths=WIDTHS)
    shapes = shape_grid({2: 4})
    ctl = DepthController(shapes, WIDTHS, lambda bs: policy.shape_costs(bs, shapes))
    with pytest.raises(ValueError, match="draft_ms"):
        SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy, depth=ctl)
    with pytest.raises(ValueError, match="deepest"):
        SpecEngine(target, drafter, mode="evict", steps=2, topk=2, policy=policy, depth=ctl)


class FakeAdaptive:
    """SGLang's adaptive protocol, scripted: the engine must follow it and report back."""

    def __init__(self, steps):
        self.steps = itertools.cycle(steps)
        self.reports = []

    def get_steps_for_batch(self, batch_size):
        return next(self.steps)

    def on_verify_complete(self, num_correct_drafts_per_req, batch_size):
        self.reports.append((list(num_correct_drafts_per_req), batch_size))


def test_adaptive_protocol_drives_the_chain_and_hears_back(pair_and_reference):
    _, target, drafter, ref = pair_and_reference
    adaptive = FakeAdaptive([3, 0, 1, 5])
    engine = SpecEngine(
        target, drafter, mode="static", steps=5, topk=1, num_draft_tokens=6, adaptive=adaptive
    )
    res = engine.generate(PROMPTS, NEW)
    assert res.tokens == ref
    assert [s.depth for s in res.steps][:4] == [3, 0, 1, 5]
    assert [s.width for s in res.steps][:4] == [4, 1, 2, 6]
    assert [r for r, _ in adaptive.reports] == [[a - 1 for a in s.accepted] for s in res.steps]
    with pytest.raises(ValueError, match="topk 1"):
        SpecEngine(target, drafter, mode="static", steps=3, topk=2, adaptive=adaptive)


def test_a_server_style_controller_weighs_plain_against_the_full_tree_only():
    """The plugin offers two shapes (plain, the full tree): a tree observation refreshes only the
    depth it lists, and the decision follows the reliability of what the drafts promised."""
    table = CostTable.from_dict(table_dict(draft={2: [0.1, 0.6, 1.1, 1.6, 2.1]}))
    policy = TruncationPolicy(table, widths=WIDTHS)
    shapes = [DraftShape(2, 0), DraftShape(2, 4)]
    ctl = DepthController(shapes, WIDTHS, lambda bs: policy.shape_costs(bs, shapes), probe_every=4)
    assert ctl.plan(1) == DraftShape(2, 4)
    scores = torch.full((1, num_candidates(4, 2)), 0.9)
    ctl.observe(DraftShape(2, 4), scores)
    assert ctl.decide(1) == DraftShape(2, 4)  # confident drafts: the tree pays
    for _ in range(40):  # ... but they are never accepted
        ctl.record_outcome(DraftShape(2, 4), predicted=8.0, realized=1.0)
    assert ctl.reliability[2] < 0.01
    assert ctl.decide(1) == DraftShape(2, 0)
    with pytest.raises(ValueError, match="families"):
        ctl.observe(DraftShape(1, 2), torch.ones(1, 2))


def test_each_shape_is_discounted_by_what_its_own_drafts_delivered():
    """A depth-1 tree that promises more than it delivers, and a full tree that keeps its promises:
    the shallow tree loses the decision. One factor for the family (their mix) would have kept it,
    since a uniform discount hurts the deeper tree's larger promise more."""
    shapes = [DraftShape(2, 0), DraftShape(2, 1), DraftShape(2, 4)]
    cost = torch.tensor([[1.0] * 4, [1.0, 1.1, 1.1, 1.1], [1.2, 1.5, 1.9, 2.6]], dtype=torch.float64)
    ctl = DepthController(shapes, [1, 2, 4, 8], lambda bs: cost, probe_every=4)
    ctl.plan(1)
    ctl.observe(DraftShape(2, 4), torch.tensor([[0.8, 0.7] + [0.4] * 4 + [0.2] * 4 + [0.1] * 4]))
    assert ctl.decide(1) == DraftShape(2, 1)  # taken at its word, the shallow tree is the better buy
    for _ in range(20):
        ctl.record_outcome(DraftShape(2, 1), predicted=1.8, realized=1.2)
        ctl.record_outcome(DraftShape(2, 4), predicted=3.4, realized=3.4)
    stats = ctl.stats()["shape_reliability"]
    assert stats["tree(1,2)"] == pytest.approx(0.25, abs=0.01) and stats["tree(4,2)"] == pytest.approx(
        1.0, abs=0.01
    )
    assert 0.25 < ctl.reliability[2] < 1.0  # the family's factor is the mix
    assert ctl.decide(1) == DraftShape(2, 4)


def test_the_modeled_column_charges_each_step_the_drafting_it_did():
    from evict.bench.runner import Bench

    table = CostTable.from_dict(table_dict())
    bench = Bench(lambda mode, policy: None, target=None, num_experts=8, modeled_table=table)
    full = float(table.step_cost(1, [8])[0])
    own = table.draft_cost(1, 2, 4)
    assert bench._modeled_step_s(1, 8, 8.0, True, (2, 4)) == pytest.approx(full / 1000)
    chain = bench._modeled_step_s(1, 4, 4.0, True, (1, 3))
    assert chain == pytest.approx(
        (float(table.step_cost(1, [4])[0]) - own + table.draft_cost(1, 1, 3)) / 1000
    )
    plain = bench._modeled_step_s(1, 1, 1.0, True, (2, 0))  # depth 0: only the draft extend
    assert plain == pytest.approx(
        (float(table.step_cost(1, [1])[0]) - own + table.draft_cost(1, 2, 0)) / 1000
    )
    # a shape the table does not price: charged as the table's own tree (the old behaviour)
    assert bench._modeled_step_s(1, 8, 8.0, True, (8, 3)) == pytest.approx(full / 1000)


def test_plain_decoding_still_probes_when_nothing_is_observed():
    """Engines and the server call observe() only after drafting: plain steps must age the families
    anyway, or a controller that once chose plain decoding would never draft again."""
    ctl = controller({2: [0.1, 0.11, 0.12, 0.13, 0.14]}, probe_every=4, max_probe_every=16)
    ctl.plan(1)
    ctl.observe(DraftShape(2, 4), torch.full((1, num_candidates(4, 2)), 0.001))
    plans = [ctl.plan(1) for _ in range(60)]  # plain steps: no observe in between
    assert DraftShape(2, 0) in plans and plans.count(DraftShape(2, 4)) >= 3
    # a probe after a long plain stretch replaces the stale average instead of blending into it
    strong = torch.full((1, num_candidates(4, 2)), 0.9)
    ctl.observe(DraftShape(2, 4), strong)
    assert ctl.decide(1) == DraftShape(2, 4)


def test_forced_steps_age_the_families_like_planned_ones():
    """The server forces plain steps while it times them: those steps must keep probes on schedule,
    and be counted, exactly as planned plain steps are."""
    shapes = {2: [0.1, 0.11, 0.12, 0.13, 0.14]}
    weak = torch.full((1, num_candidates(4, 2)), 0.001)
    planned, forced = (controller(shapes, probe_every=4, max_probe_every=4) for _ in range(2))
    for ctl in (planned, forced):
        ctl.plan(1)
        ctl.observe(DraftShape(2, 4), weak)
    plain = DraftShape(2, 0)
    assert planned.plan(1) == plain
    for _ in range(2):
        planned.plan(1)
        assert forced.force(plain) == plain
    forced.plan(1)
    # the same steps since: both probe on the same step, and count the same shapes
    after = [planned.plan(1) for _ in range(4)]
    assert after == [forced.plan(1) for _ in range(4)]
    assert DraftShape(2, 4) in after
    assert forced.stats()["shapes"] == planned.stats()["shapes"]
    with pytest.raises(ValueError, match="not one of"):
        forced.force(DraftShape(3, 2))


# ------------------------------------------------------------ measured prices and probe budget


def _two_shape_controller(**kw):
    """Plain decoding against a (4, 2) tree whose drafts promise 0.6 tokens per node."""
    table = CostTable.from_dict(table_dict(draft={2: [0.5, 0.6, 1.1, 1.6, 2.1]}))
    policy = TruncationPolicy(table, widths=WIDTHS)
    shapes = [DraftShape(2, 0), DraftShape(2, 4)]
    ctl = DepthController(shapes, WIDTHS, lambda bs: policy.shape_costs(bs, shapes), **kw)
    assert ctl.plan(8) == DraftShape(2, 4)  # warm-up
    ctl.observe(DraftShape(2, 4), torch.full((8, num_candidates(4, 2)), 0.6))
    return ctl, policy, shapes


def test_measured_step_times_correct_the_price_of_each_shape():
    ctl, policy, shapes = _two_shape_controller()
    assert ctl.decide(8) == DraftShape(2, 4)
    assert torch.equal(ctl.cost_factors(8), torch.ones(2, dtype=torch.float64))
    plain_price = float(policy.shape_costs(8, shapes)[0, 0])
    tree_price = float(policy.shape_costs(8, shapes)[1, 2])
    # the tree's steps measure 3x their price and the plain step its price: plain decoding wins
    for _ in range(5):
        ctl.record_step(DraftShape(2, 4), 8, tree_price, 3.0 * tree_price)
    ctl.record_step(DraftShape(2, 0), 8, plain_price, plain_price)
    assert ctl.cost_factors(8).tolist() == pytest.approx([1.0, 3.0])
    assert ctl.decide(8) == DraftShape(2, 0)
    assert torch.allclose(
        ctl.priced(8), policy.shape_costs(8, shapes).double() * torch.tensor([[1.0], [3.0]])
    )
    # a batch-size bucket without samples takes the nearest measured bucket's factors
    assert ctl.cost_factors(9).tolist() == pytest.approx([1.0, 3.0])  # 9 falls in bucket 8
    assert ctl.cost_factors(64).tolist() == pytest.approx([1.0, 3.0])
    assert ctl.stats()["cost_factors"] == {"bs8:plain": 1.0, "bs8:tree(4,2)": 3.0}


def test_an_unmeasured_shape_takes_the_median_of_the_measured_ones():
    ctl, policy, shapes = _two_shape_controller()
    tree_price = float(policy.shape_costs(4, shapes)[1, 2])
    for ratio in (0.5, 0.4, 0.6, 9.0):  # the median shrugs off one slow step
        ctl.record_step(DraftShape(2, 4), 4, tree_price, ratio * tree_price)
    assert ctl.cost_factors(4).tolist() == pytest.approx([0.55, 0.55])
    # bad samples are ignored, unknown shapes refused
    ctl.record_step(DraftShape(2, 4), 4, tree_price, float("nan"))
    ctl.record_step(DraftShape(2, 4), 4, 0.0, 1.0)
    assert ctl.cost_factors(4).tolist() == pytest.approx([0.55, 0.55])
    with pytest.raises(ValueError, match="shapes"):
        ctl.record_step(DraftShape(1, 2), 4, 1.0, 1.0)


def _probe_steps(ctl, steps=60):
    weak = torch.full((1, num_candidates(4, 2)), 0.001)
    plans = []
    for _ in range(steps):
        shape = ctl.plan(1)
        plans.append(shape.depth)
        ctl.observe(shape, weak[:, : shape.candidates])
    return [i for i, d in enumerate(plans) if d == 4][1:]  # probes (the first was the warm-up)


def test_probes_wait_until_their_extra_cost_fits_the_budget():
    dear = {2: [0.1, 0.5, 1.0, 1.5, 20.0]}  # drafting the deep tree costs ~20x a plain step
    free = _probe_steps(controller(dear, probe_every=3, max_probe_every=3, probe_budget=0.0))
    ctl = controller(dear, probe_every=3, max_probe_every=100, probe_budget=0.5)
    budgeted = _probe_steps(ctl, 120)
    assert free[:3] == [3, 6, 9]  # the interval alone
    priced = ctl.priced(1)
    # with these weak drafts the probe would verify the root alone, as plain decoding does
    extra, base = float(priced[-1, 0] - priced[0, 0]), float(priced[0, 0])
    wait = math.ceil(extra / (0.5 * base))
    assert 3 < wait < 100
    assert budgeted and all(b - a >= wait for a, b in zip([0, *budgeted], budgeted))
    # ... but never longer than max_probe_every: only a probe re-measures a stale price
    capped = _probe_steps(controller(dear, probe_every=3, max_probe_every=8, probe_budget=0.01), 60)
    assert capped[:3] == [8, 16, 24]
    with pytest.raises(ValueError, match="probe_budget"):
        controller(dear, probe_budget=-1.0)


def test_new_requests_relax_what_earlier_requests_taught():
    """A request whose drafts are never accepted drives the decision to plain decoding; the request
    after it is not judged by that: the reliability relaxes, by the share of new requests, toward
    what the requests that left taught, the probe back-off restarts, and the full tree is chosen
    again."""
    ctl = controller({2: [0.1, 0.3, 0.5, 0.7, 0.9]}, probe_every=4, max_probe_every=64)
    assert ctl.on_requests(["a"]) == 1.0
    ctl.plan(1)
    ctl.observe(DraftShape(2, 4), torch.full((1, num_candidates(4, 2)), 0.6))
    assert ctl.decide(1) == DraftShape(2, 4)
    for _ in range(20):  # request "a": the drafter's promises never hold
        ctl.record_outcome(DraftShape(2, 4), predicted=4.0, realized=1.0)
    ctl._interval[2] = 64  # backed off after probes that changed nothing
    assert ctl.on_requests(["a"]) == 0.0 and ctl.decide(1) == DraftShape(2, 0)
    assert ctl.on_requests(["a", "b"]) == 0.5  # half the batch is new: halfway back (none left yet)
    assert ctl.reliability[2] == pytest.approx(0.5, abs=0.01) and ctl._interval[2] == 32
    assert ctl.on_requests(["b"]) == 0.0  # "a" left: half the batch's verdict joins the population
    pop = 1.0 + POPULATION_RATE * 0.5 * (ctl.reliability[2] - 1.0)
    assert ctl.population_reliability[2] == pytest.approx(pop)
    taught_by_b = ctl.reliability[2]
    assert ctl.on_requests(["c"]) == 1.0  # "b" left, "c" is all new: it starts from the population
    pop += POPULATION_RATE * (taught_by_b - pop)
    assert ctl.reliability[2] == pytest.approx(pop) and ctl._interval[2] == 4
    assert ctl.decide(1) == DraftShape(2, 4)


def test_a_new_batch_keeps_the_drafters_overconfidence_every_request_showed():
    """Every request of a batch found the drafter's promises held half-way: that is the drafter's,
    not a request's, so a whole new batch starts from it (relaxing toward 1 made each fresh batch
    of the reference engine trust the deep trees again); its probe back-off restarts."""
    ctl = controller({2: [0.1, 0.3, 0.5, 0.7, 0.9]}, probe_every=4, max_probe_every=64)
    first = [f"a{i}" for i in range(8)]
    ctl.on_requests(first)
    ctl.plan(8)
    ctl.observe(DraftShape(2, 4), torch.full((8, num_candidates(4, 2)), 0.6))
    for _ in range(40):
        ctl.record_outcome(DraftShape(2, 4), predicted=3.0, realized=2.0)
    assert ctl.decide(8).depth > 0
    ctl._interval[2] = 64
    for n in range(7, 0, -1):  # the static batch's tail: its requests leave one by one
        ctl.on_requests(first[:n])
    ctl.on_requests([f"b{i}" for i in range(8)])
    assert ctl.reliability[2] == pytest.approx(ctl.population_reliability[2])
    assert 0.5 < ctl.reliability[2] < 0.75  # most of the way to the 0.5 every request showed
    assert ctl._interval[2] == 4


def test_the_modeled_gpu_decision_is_not_corrected_by_cpu_step_times():
    """The bench's '@gpu' whole-step mode decides from the modeled table: this machine's step times
    must not rescale those prices (they would price every shape at its CPU / GPU ratio)."""
    from evict.bench.cli import whole_step_controller

    policy = TruncationPolicy(CostTable.from_dict(table_dict()), widths=WIDTHS)
    measured, modeled = (whole_step_controller(policy, 4, 2, measured=m) for m in (True, False))
    for ctl in (measured, modeled):
        ctl.record_step(ctl.shapes[0], 1, priced_ms=1.0, measured_ms=40.0)
    assert measured.cost_factors(1)[0] == 10.0 and torch.equal(
        modeled.priced(1), policy.shape_costs(1, modeled.shapes).double()
    )
