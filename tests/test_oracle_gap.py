"""The oracle-gap decomposition (``evict.bench.oracle_gap``): its exact-replay claim and its ceiling.

The tool never decodes a cut tree: it reads what a cut to width m would have accepted off one
full-tree decode. These tests check that claim against real decodes at each width, and that the
width oracle really is the best any per-step width choice can do.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_fixtures import oracle_pair

from evict.bench import oracle_gap as og
from evict.engine import SpecEngine
from evict.profiler import timing

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 3, 3]]
STEPS, TOPK = 3, 2  # K = 2 + 2 * 4 = 10 candidates


def test_acceptance_by_width_counts_the_leading_path_nodes_inside_the_cut():
    step = og.CapturedStep(scores=torch.zeros((2, 10)), path_ranks=[[0, 2, 5], []])
    widths = torch.tensor([2, 3, 4, 7, 11])
    # width m keeps ranks < m - 1; the bonus token always counts
    assert og.acceptance_by_width(step, widths).tolist() == [[2, 2, 3, 4, 4], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def pair():
    return oracle_pair(0)


def test_the_capture_predicts_what_each_width_really_accepts(pair):
    """First decode step of a batch: the full-tree capture and a real decode at width m start from
    the same state and draft the same tree, so the replayed acceptance must equal the real one."""
    target, drafter = pair
    full = SpecEngine(target, drafter, mode="static", steps=STEPS, topk=TOPK)
    steps = og.capture_steps(full, [PROMPTS], 6)
    assert steps and all(s.batch_size <= len(PROMPTS) for s in steps)
    widths = [2, 3, 4, 6, 8, 11]
    replay = og.acceptance_by_width(steps[0], torch.tensor(widths))
    deep = 0
    for j, m in enumerate(widths):
        real = SpecEngine(target, drafter, mode="static", steps=STEPS, topk=TOPK, num_draft_tokens=m)
        first = real.generate(PROMPTS, 6).steps[0]
        assert replay[:, j].tolist() == first.accepted, f"width {m}"
        deep += sum(a > 2 for a in first.accepted)
    assert deep > 0  # the check covers paths longer than one node
    assert full.observer is None  # the hook is removed after the capture


def test_the_width_oracle_is_the_best_ratio_of_sums_over_all_per_step_choices():
    gen = torch.Generator().manual_seed(3)
    accs = [torch.randint(1, 6, (2, 3), generator=gen).cummax(dim=1).values for _ in range(4)]
    costs = [torch.tensor([1.0, 1.7, 2.9]) + torch.rand(3, generator=gen) for _ in range(4)]
    picks = og._width_oracle(accs, costs, start=1.0)

    def ratio(choice):
        return sum(float(a[:, j].sum()) for a, j in zip(accs, choice)) / sum(
            float(c[j]) for c, j in zip(costs, choice)
        )

    best = max(itertools.product(range(3), repeat=4), key=ratio)
    assert ratio(picks) == pytest.approx(ratio(best))


def test_gap_rows_bound_every_width_rule_by_the_width_oracle(pair):
    target, drafter = pair
    full = SpecEngine(target, drafter, mode="static", steps=STEPS, topk=TOPK)
    steps = og.capture_steps(full, [PROMPTS, PROMPTS[:2]], 8)
    widths = [2, 3, 4, 6, 8, 11]
    # a made-up convex step time per (active batch size, width)
    step_ms = {(b, m): 5.0 + 0.4 * b * m + 0.02 * (b * m) ** 2 for b in (1, 2, 3) for m in widths}
    rows, diag = og.gap_rows(steps, widths, step_ms)
    by_name = {r.name: r for r in rows}
    oracle = by_name["width oracle"].throughput
    for r in rows:
        if r.name != "node oracle":
            assert r.throughput <= oracle * (1 + 1e-6), r.name
    assert diag["best_static_width"] in widths
    r2 = diag["r2_predicted_vs_realized"]
    assert r2 != r2 or 0.0 <= r2 <= 1.0  # NaN when the realized lengths are constant
    text = og.render_gap(3, rows, diag)
    assert "width oracle" in text and "(best static)" in text


@pytest.mark.parametrize("plain_ms", [0.5, 4.0, 1e6])
def test_plain_or_tree_rows_bound_the_depth_choice(pair, plain_ms):
    """The depth rows: the oracle over plain-or-any-width beats the width oracle, the rule and all-plain
    decoding; a nearly free plain step makes the rule decode plainly, a prohibitive one never."""
    target, drafter = pair
    full = SpecEngine(target, drafter, mode="static", steps=STEPS, topk=TOPK)
    steps = og.capture_steps(full, [PROMPTS, PROMPTS[:2]], 8)
    widths = [2, 3, 4, 6, 8, 11]
    step_ms = {(b, m): 5.0 + 0.4 * b * m + 0.02 * (b * m) ** 2 for b in (1, 2, 3) for m in widths}
    step_ms.update({(b, og.PLAIN): plain_ms for b in (1, 2, 3)})
    rows, _ = og.gap_rows(steps, widths, step_ms)
    by_name = {r.name: r for r in rows}
    rule, oracle = by_name["plain or tree (rule)"], by_name["plain or tree oracle"]
    all_plain = sum(s.batch_size for s in steps) / (plain_ms * len(steps))
    for r in [*rows, og.GapRow("all plain", tokens=all_plain, time_ms=1.0)]:
        if r.name not in ("node oracle", oracle.name):
            assert r.throughput <= oracle.throughput * (1 + 1e-6), r.name
    if plain_ms == 0.5:  # plain decoding wins every step the rule can see (all but the first)
        assert rule.width_sum / rule.batch_steps < 2 and oracle.width_sum == oracle.batch_steps
    if plain_ms == 1e6:  # never plain: the rule is EVICT's width rule on measured costs
        measured = by_name["evict (measured)"]
        assert (rule.tokens, rule.time_ms) == pytest.approx((measured.tokens, measured.time_ms))
    without = {k: v for k, v in step_ms.items() if k[1] != og.PLAIN}
    assert "plain or tree oracle" not in {r.name for r in og.gap_rows(steps, widths, without)[0]}


@pytest.mark.parametrize(
    "argv,problem",
    [
        (["--widths", "1", "4"], "--widths must be >= 2"),
        (["--widths", "4", "2"], "ascending"),
        (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    ],
)
def test_bad_arguments_end_with_one_line_and_status_2(argv, problem, capsys):
    with pytest.raises(SystemExit) as exc:
        og.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1


class _Step:
    def __init__(self, active: int, ms: float) -> None:
        self.active = list(range(active))
        self.draft_s, self.decision_s, self.verify_s, self.extend_s = 0.001 * ms, 0.0, 0.0, 0.0


class _Result:
    def __init__(self, steps: list[_Step]) -> None:
        self.steps = steps


class _FakeEngine:
    """Three full-batch steps (the middle one disturbed), then a tail step with one request left."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, n):
        self.calls += 1
        bs = len(prompts)
        return _Result([_Step(bs, 3.0), _Step(bs, 90.0), _Step(bs, 3.0 + self.calls), _Step(1, 500.0)])


def test_a_decode_step_is_the_median_of_the_full_batch_steps():
    engine = _FakeEngine()
    samples = timing.decode_step_samples(engine, [[1, 2], [3]], new_tokens=8, repeats=2, warmup=1)
    # warm-up call 1 dropped; calls 2 and 3: median of (3, 90, 3 + call); the tail step never counts
    assert samples == pytest.approx([5.0, 6.0]) and engine.calls == 3
    assert timing.decode_step_ms(_FakeEngine(), [[1], [2]], repeats=1, warmup=0) == pytest.approx(4.0)


def test_a_decode_without_a_full_batch_step_is_refused():
    class Empty:
        def generate(self, prompts, n):
            return _Result([_Step(1, 2.0)])

    with pytest.raises(RuntimeError, match="no decode step with all 2 prompts active"):
        timing.decode_step_ms(Empty(), [[1], [2]], repeats=1, warmup=0)
