"""Per-request widths inside one batch: the batch-budget rule, padded verify slots, the engine.

The rule is checked against brute force over every per-request count vector; the padding against
an acceptance walk that would accept a padded slot if it were linked to the root; the engine
against target-only greedy decoding with padding really occurring.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_fixtures import greedy_reference, oracle_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from evict.engine import SpecEngine
from evict.engine.acceptance import greedy_accept, sampling_accept
from evict.engine.tree_layout import PAD_PARENT, DraftTree, select_verify_tree
from evict.truncation import (
    TruncationPolicy,
    choose_width,
    choose_widths_batch_budget,
    is_ancestor_closed,
)


def random_tree(gen: torch.Generator, bs: int, k: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang-layout trees (parent index below own index) with cumulative-product scores."""
    parents = torch.empty(bs, k, dtype=torch.long)
    scores = torch.empty(bs, k)
    for r in range(bs):
        for i in range(k):
            p = int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1
            parents[r, i] = p
            prob = (
                [0.0, 0.5, 1.0][int(torch.randint(0, 3, (1,), generator=gen))]
                if ties
                else float(torch.rand((), generator=gen))
            )
            scores[r, i] = (1.0 if p < 0 else float(scores[r, p])) * prob
    return parents, scores


def brute_force(scores: torch.Tensor, cost: list[float], widths: list[int], pad_cost: float) -> float:
    """Best objective over every (width i, budget j <= i) and every count vector within them."""
    bs, k = scores.shape
    srt = scores.sort(dim=1, descending=True).values
    best = -1.0
    for i, wi in enumerate(widths):
        cap = min(wi, k + 1) - 1
        for j in range(i + 1):
            budget = bs * (min(widths[j], k + 1) - 1)
            c = cost[j] + pad_cost * (cost[i] - cost[j])
            for counts in itertools.product(range(cap + 1), repeat=bs):
                if sum(counts) > budget:
                    continue
                b = bs + sum(float(srt[r, : counts[r]].sum()) for r in range(bs))
                best = max(best, b / c)
    return best


params = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(1, 3),  # bs
    st.integers(1, 6),  # K
    st.sampled_from([(1, 2, 4), (1, 2, 3, 5), (2, 4, 8), (1,)]),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(params)
def test_batch_budget_matches_brute_force_and_is_closed(p):
    seed, bs, k, widths, pad_cost, ties = p
    gen = torch.Generator().manual_seed(seed)
    parents, scores = random_tree(gen, bs, k, ties)
    cost = (1.0 + torch.rand(len(widths), generator=gen).cumsum(0)).tolist()
    d = choose_widths_batch_budget(scores, cost, list(widths), pad_cost=pad_cost)
    m = d.width
    assert d.kept.shape == (bs, m - 1)
    counts = d.kept_counts
    assert torch.equal(counts, (d.kept >= 0).sum(dim=1))
    # rows: ascending real indices, then only padding
    for r in range(bs):
        row = d.kept[r].tolist()
        real = row[: int(counts[r])]
        assert real == sorted(real) and all(v == -1 for v in row[int(counts[r]) :])
    # budget respected: at most bs * (m_j - 1) real nodes, m_j the budget width (<= m)
    j = d.budget_index
    assert j is not None and j <= d.width_index
    assert int(counts.sum()) <= bs * (min(widths[j], k + 1) - 1)
    assert int(counts.max()) <= m - 1
    mask = torch.zeros(bs, k, dtype=torch.bool)
    for r in range(bs):
        mask[r, d.kept[r, : int(counts[r])]] = True
    assert bool(is_ancestor_closed(parents, mask).all())
    # optimal over every count vector, and the kept set really achieves it
    c = cost[j] + pad_cost * (cost[d.width_index] - cost[j])
    realized = (bs + float((scores * mask).sum())) / c
    assert realized == pytest.approx(brute_force(scores, cost, list(widths), pad_cost), rel=1e-5, abs=1e-5)
    assert torch.allclose(d.expected_accepted, 1.0 + (scores * mask).sum(dim=1), atol=1e-5)


def test_pad_cost_one_is_the_one_width_rule():
    gen = torch.Generator().manual_seed(3)
    _, scores = random_tree(gen, 4, 12, ties=False)
    cost, widths = [1.0, 1.2, 1.6, 2.5], [1, 2, 4, 8]
    one = choose_width(scores, cost, widths)
    per = choose_widths_batch_budget(scores, cost, widths, pad_cost=1.0)
    assert per.width == one.width and torch.equal(per.kept, one.kept)
    assert torch.equal(per.kept_counts, torch.full((4,), one.width - 1))


def test_free_padding_moves_the_budget_to_confident_requests():
    # request 0 is confident (deep chain), request 1 is hopeless: with free padding, request 1's
    # nodes go to request 0, which verifies more than the one-width rule gives it, for less
    k = 8
    parents = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6]] * 2)
    scores = torch.stack([0.95 ** torch.arange(1, k + 1).float(), 0.01 ** torch.arange(1, k + 1).float()])
    cost, widths = [1.0, 1.3, 1.7, 2.6], [1, 2, 4, 8]
    d = choose_widths_batch_budget(scores, cost, widths, pad_cost=0.0)
    assert d.kept_counts.tolist()[1] == 0 and d.kept_counts.tolist()[0] >= 3
    one = choose_width(scores, cost, widths)
    assert d.kept_counts.tolist()[0] > one.width - 1 or d.budget_index < d.width_index
    assert float(d.objective.max()) > 1.05 * float(one.objective.max())
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[0, d.kept[0, : int(d.kept_counts[0])]] = True
    assert bool(is_ancestor_closed(parents, mask).all())


def test_bad_scores_fall_back_to_the_full_tree():
    scores = torch.rand(2, 6)
    scores[1, 2] = float("nan")
    d = choose_widths_batch_budget(scores, [1.0, 1.5, 3.0], [1, 2, 8], pad_cost=0.0)
    assert d.width == 7 and d.kept_counts.tolist() == [6, 6] and d.fallback.tolist() == [False, True]
    # under a fixed width (lagged / off) a fallback keeps that width with its full budget
    d = choose_widths_batch_budget(scores, [1.0, 1.5, 3.0], [1, 2, 8], pad_cost=0.0, index=1)
    assert d.width == 2 and d.kept_counts.tolist() == [1, 1]


def test_pad_cost_is_validated():
    with pytest.raises(ValueError, match="pad_cost"):
        choose_widths_batch_budget(torch.rand(1, 3), [1.0, 2.0], [1, 2], pad_cost=1.5)
    with pytest.raises(ValueError, match="pad_cost"):
        TruncationPolicy([1.0, 2.0], widths=[1, 2], per_request=True, pad_cost=-0.1)
    with pytest.raises(ValueError, match="immediate"):
        TruncationPolicy([1.0, 2.0], widths=[1, 2], per_request=True, decision="lagged")


# ------------------------------------------------------------------------------ padded slots


def _padded_tree() -> tuple[DraftTree, torch.Tensor, torch.Tensor]:
    """Two requests, K = 3 (a chain 0 -> 1 -> 2); request 1 keeps only node 0, two padded slots."""
    tree = DraftTree(
        scores=torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.1, 0.05]]),
        tokens=torch.tensor([[5, 6, 7], [5, 6, 7]]),
        parents=torch.tensor([[-1, 0, 1], [-1, 0, 1]]),
    )
    kept = torch.tensor([[0, 1, 2], [0, -1, -1]])
    root = torch.tensor([4, 4])
    return tree, kept, root


def test_padded_slots_hold_the_root_token_and_link_to_nothing():
    tree, kept, root = _padded_tree()
    v = select_verify_tree(tree, kept, root)
    assert v.tokens[1].tolist() == [4, 5, 4, 4]
    assert v.parent[1].tolist() == [-1, 0, PAD_PARENT, PAD_PARENT]
    assert v.depth[1].tolist() == [0, 1, 0, 0]
    # nobody attends to a padded slot except itself; it attends to nothing in the tree but itself
    anc = v.ancestors[1]
    assert anc[:, 2].tolist() == [False, False, True, False]
    assert anc[2].tolist() == [False, False, True, False]
    assert v.parent[0].tolist() == [-1, 0, 1, 2]  # the full row is untouched


def test_padded_slots_are_never_accepted():
    tree, kept, root = _padded_tree()
    v = select_verify_tree(tree, kept, root)
    # the target predicts the root token (4) everywhere: a padded slot holds 4, so it would be
    # accepted if it were a child of the root or of node 1
    pred = torch.full((2, 4), 4)
    pred[1, 0] = 5  # request 1 accepts its real node 0 ...
    acc = greedy_accept(v.tokens, v.parent, pred)
    assert acc.path[1].tolist() == [0, 1, -1, -1]  # ... and stops there: no padded slot
    assert acc.num_accepted[1] == 1 and acc.bonus[1] == 4
    # sampling: the target puts all its mass on the root token; padding is still never accepted
    probs = torch.zeros(2, 4, 8)
    probs[:, :, 4] = 1.0
    probs[1, 0] = 0.0
    probs[1, 0, 5] = 1.0
    acc = sampling_accept(v.tokens, v.parent, probs, torch.full((2, 4), 0.5), torch.full((2,), 0.5))
    assert acc.path[1].tolist() == [0, 1, -1, -1] and acc.bonus[1] == 4


# ------------------------------------------------------------------------------ the engine

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 3, 3]]


def test_engine_per_request_is_lossless_and_really_pads():
    target, drafter = oracle_pair(0)
    ref = [greedy_reference(target, p, 14) for p in PROMPTS]
    policy = TruncationPolicy(
        [1.0, 1.35, 1.8, 2.6, 4.0], widths=[1, 2, 4, 8, 16], per_request=True, pad_cost=0.0
    )
    res = SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy).generate(PROMPTS, 14)
    assert res.tokens == ref
    padded = [s for s in res.steps if s.kept_counts is not None and min(s.kept_counts) < s.width - 1]
    assert padded  # some request really kept fewer nodes than the batch width
    for s in res.steps:
        # a request never accepts more candidates than it kept (padding is never accepted)
        assert all(a - 1 <= c for a, c in zip(s.accepted, s.kept_counts))


# ------------------------------------------------------------------------------ the bench

MODELED = (
    __import__("pathlib").Path(__file__).resolve().parents[1]
    / "configs"
    / "modeled_h100_qwen3_30b_a3b_cost_table.json"
)


def test_build_modes_adds_per_request_and_modeled_gpu_rows():
    import argparse

    from evict.bench.cli import build_modes

    args = argparse.Namespace(
        chain_steps=3, static_trees=[], evict_tree=(3, 2, 8), acceptance="both", no_oracle=False,
        moe_spec_budget=0, per_request="both", modeled_gpu_table=MODELED,
    )  # fmt: skip
    modes = {m.name: m for m in build_modes(args, None, [])}
    assert (
        not modes["evict"].per_request and modes["evict+pr"].per_request and modes["evict+cal+pr"].per_request
    )
    assert modes["evict+cal+pr"].acceptance == "calibrated"
    gpu = [m for m in modes.values() if m.cost == "modeled"]
    assert {m.name for m in gpu} == {"evict@gpu", "evict+cal@gpu", "evict+pr@gpu", "evict+cal+pr@gpu"}
    args.per_request, args.modeled_gpu_table = "on", None
    modes = build_modes(args, None, [])
    assert all(m.per_request for m in modes if m.kind == "evict") and all(m.cost != "modeled" for m in modes)


def test_modeled_step_charge_uses_real_tokens_and_free_padding():
    from evict.bench.runner import Bench
    from evict.profiler.table import CostTable

    table = CostTable.load(MODELED)
    assert table.metadata["modeled"] is True and table.metadata["padding_cost"] == 0.0
    bench = Bench(lambda m, p: None, torch.nn.Linear(1, 1), 8, table=table, modeled_table=table)
    full = float(table.step_cost(4, [8])[0]) / 1000
    assert bench._modeled_step_s(4, 8, 8.0, True) == pytest.approx(full)
    # half the slots padded: charged as 4.5 real tokens per request (padding free in this table)
    assert bench._modeled_step_s(4, 8, 4.5, True) == pytest.approx(float(table.step_cost(4, [4.5])[0]) / 1000)
    assert bench._modeled_step_s(4, 8, 4.5, True) < full
    # autoregressive decoding drafts nothing: the drafter's fixed_ms is not charged
    ar = float(table.step_cost(4, [1])[0]) - table.fixed_ms[1]
    assert bench._modeled_step_s(4, 1, 1.0, False) == pytest.approx(ar / 1000)
    # the table is GPU-shaped: wider verifies cost more, and steeply at batch size 1
    c = table.step_cost(1, [1, 8, 64])
    assert float(c[0]) < float(c[1]) < float(c[2]) and float(c[2]) > 3 * float(c[0])
