"""Tests of EVICT's truncation rule against brute force over all ancestor-closed subtrees."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evict.truncation import (
    choose_width,
    choose_widths_per_request,
    expected_accepted_lengths,
    is_ancestor_closed,
    keep_top,
    sanitize_scores,
    sort_candidates,
    validate_parents,
)

WIDTH_SETS = [(1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 4, 8), (1, 3, 5), (2, 4, 6, 9), (1,), (4, 16, 64)]


# ---------------------------------------------------------------------------------------------
# Random trees and brute force
# ---------------------------------------------------------------------------------------------


def random_tree(gen: torch.Generator, bs: int, k: int, tie_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random SGLang-layout trees: parent index < own index; cumulative-product scores."""
    parents = torch.empty(bs, k, dtype=torch.long)
    scores = torch.empty(bs, k, dtype=torch.float32)
    for r in range(bs):
        for i in range(k):
            p = int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1
            parents[r, i] = p
            if tie_probs:
                prob = [0.0, 0.5, 1.0][int(torch.randint(0, 3, (1,), generator=gen))]
            else:
                prob = float(torch.rand((), generator=gen))
            base = 1.0 if p < 0 else float(scores[r, p])
            scores[r, i] = base * prob
    return parents, scores


def random_cost(gen: torch.Generator, widths: tuple[int, ...], staircase: bool) -> torch.Tensor:
    n = len(widths)
    if staircase:
        jumps = (torch.rand(n, generator=gen) < 0.35).float() * torch.rand(n, generator=gen) * 3.0
        inc = jumps
    else:
        inc = torch.rand(n, generator=gen) * torch.rand((), generator=gen) * 2.0
    inc[0] = 0.0
    return 1.0 + torch.rand((), generator=gen) + inc.cumsum(0)


def closed_subsets(parents_row: list[int], k: int) -> dict[int, list[tuple[int, ...]]]:
    """All ancestor-closed subsets of the K candidates, grouped by size."""
    out: dict[int, list[tuple[int, ...]]] = {}
    for mask in range(1 << k):
        subset = tuple(i for i in range(k) if mask >> i & 1)
        if all(parents_row[i] < 0 or (mask >> parents_row[i] & 1) for i in subset):
            out.setdefault(len(subset), []).append(subset)
    return out


def brute_force(
    parents: torch.Tensor, scores: torch.Tensor, cost: torch.Tensor, widths: tuple[int, ...]
) -> tuple[float, list[list[float]]]:
    """Return (best global objective, per-request best benefit B_r(m) for each width)."""
    bs, k = scores.shape
    per_req: list[list[float]] = []
    for r in range(bs):
        subsets = closed_subsets(parents[r].tolist(), k)
        row = []
        for m in widths:
            size = min(m, k + 1) - 1
            row.append(1.0 + max(sum(float(scores[r, i]) for i in s) for s in subsets[size]))
        per_req.append(row)
    best = max(sum(per_req[r][j] for r in range(bs)) / float(cost[j]) for j in range(len(widths)))
    return best, per_req


def mask_from_kept(kept: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(kept.shape[0], k, dtype=torch.bool)
    mask.scatter_(1, kept, True)
    return mask


tree_params = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 3),  # bs
    st.integers(1, 7),  # K
    st.sampled_from(WIDTH_SETS),
    st.booleans(),  # staircase cost
    st.booleans(),  # tie-heavy probabilities
)


# ---------------------------------------------------------------------------------------------
# Brute-force equivalence
# ---------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(tree_params)
def test_choose_width_matches_brute_force(params):
    seed, bs, k, widths, staircase, ties = params
    gen = torch.Generator().manual_seed(seed)
    parents, scores = random_tree(gen, bs, k, ties)
    cost = random_cost(gen, widths, staircase)
    best, _ = brute_force(parents, scores, cost, widths)

    d = choose_width(scores, cost, torch.tensor(widths))
    assert d.kept.shape == (bs, d.width - 1)
    assert d.width == min(widths[d.width_index], k + 1)
    # The objective reported for the chosen width is the brute-force optimum ...
    assert float(d.objective[d.width_index]) == pytest.approx(best, abs=1e-5, rel=1e-5)
    assert float(d.objective.max()) == pytest.approx(best, abs=1e-5, rel=1e-5)
    # ... and the kept set actually achieves it and is a valid subtree.
    realized = (1.0 + scores.gather(1, d.kept).sum(-1)).sum() / cost[d.width_index]
    assert float(realized) == pytest.approx(best, abs=1e-5, rel=1e-5)
    mask = mask_from_kept(d.kept, k)
    assert bool(is_ancestor_closed(parents, mask).all())
    assert torch.equal(d.kept, d.kept.sort(-1).values)
    assert not bool(d.fallback.any())
    assert torch.allclose(d.expected_accepted, 1.0 + scores.gather(1, d.kept).sum(-1), atol=1e-6)


@settings(max_examples=80, deadline=None)
@given(tree_params)
def test_choose_widths_per_request_matches_brute_force(params):
    seed, bs, k, widths, staircase, ties = params
    gen = torch.Generator().manual_seed(seed)
    parents, scores = random_tree(gen, bs, k, ties)
    cost = random_cost(gen, widths, staircase)
    _, per_req = brute_force(parents, scores, cost, widths)

    widths_r, kept_mask = choose_widths_per_request(scores, cost, torch.tensor(widths))
    assert widths_r.shape == (bs,) and kept_mask.shape == (bs, k)
    assert bool(is_ancestor_closed(parents, kept_mask).all())
    assert torch.equal(kept_mask.sum(-1), widths_r - 1)
    for r in range(bs):
        best_r = max(per_req[r][j] / float(cost[j]) for j in range(len(widths)))
        got = (1.0 + float(scores[r][kept_mask[r]].sum())) / float(
            cost[[min(w, k + 1) for w in widths].index(int(widths_r[r]))]
        )
        assert got == pytest.approx(best_r, abs=1e-5, rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 12))
def test_every_prefix_is_ancestor_closed_with_ties(seed, bs, k):
    gen = torch.Generator().manual_seed(seed)
    parents, scores = random_tree(gen, bs, k, tie_probs=True)
    for m in range(1, k + 2):
        kept = keep_top(scores, m)
        assert kept.shape == (bs, m - 1)
        assert bool(is_ancestor_closed(parents, mask_from_kept(kept, k)).all())


def test_all_equal_scores_keep_lowest_indices():
    # chain 0 <- 1 <- 2 ... with every score exactly 1.0, then all 0.0: ties must follow index order
    k = 6
    parents = torch.tensor([[-1, 0, 1, 2, 3, 4]])
    for value in (1.0, 0.0):
        scores = torch.full((1, k), value)
        for m in range(1, k + 2):
            kept = keep_top(scores, m)
            assert kept.tolist() == [list(range(m - 1))]
            assert bool(is_ancestor_closed(parents, mask_from_kept(kept, k)).all())


def test_sort_candidates_is_stable_descending():
    s = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.2, 0.5]])
    sorted_s, order = sort_candidates(s)
    assert order.tolist() == [[1, 3, 0, 2, 5, 4]]
    assert sorted_s.tolist()[0] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.2])


# ---------------------------------------------------------------------------------------------
# Properties from DESIGN.md section 2
# ---------------------------------------------------------------------------------------------


def test_flat_cost_gives_full_tree():
    gen = torch.Generator().manual_seed(0)
    _, scores = random_tree(gen, 4, 20, tie_probs=False)
    scores = scores.clamp(min=1e-3)  # every node adds benefit
    widths = torch.tensor([1, 2, 4, 8, 16, 21])
    d = choose_width(scores, torch.full((6,), 5.0), widths)
    assert d.width == 21 and d.kept.shape == (4, 20)


def test_steep_cost_weak_draft_gives_width_one():
    scores = torch.full((3, 10), 0.05)
    d = choose_width(scores, torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([1, 2, 4, 8]))
    assert d.width == 1 and d.width_index == 0
    assert d.kept.shape == (3, 0)
    assert torch.equal(d.expected_accepted, torch.ones(3))


def test_global_argmax_not_first_local_maximum():
    # staircase: width 2 beats 4 (local max), but 16 is the global max
    scores = torch.full((1, 15), 0.9)
    widths = torch.tensor([1, 2, 4, 16])
    cost = torch.tensor([1.0, 1.0, 3.0, 3.0])
    d = choose_width(scores, cost, widths)
    obj = d.objective
    assert obj[1] > obj[2]  # a local maximum at width 2
    assert d.width == 16 and int(obj.argmax()) == 3


def test_objective_tie_goes_to_smaller_width():
    # B(1) = 1, B(2) = 1.5: costs 1 and 1.5 give exactly equal objectives
    scores = torch.tensor([[0.5, 0.0, 0.0]])
    d = choose_width(scores, torch.tensor([1.0, 1.5]), torch.tensor([1, 2]))
    assert float(d.objective[0]) == float(d.objective[1])
    assert d.width == 1
    w_r, _ = choose_widths_per_request(scores, torch.tensor([1.0, 1.5]), torch.tensor([1, 2]))
    assert w_r.tolist() == [1]


def test_widths_beyond_tree_size_are_clamped():
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    b = expected_accepted_lengths(scores, torch.tensor([1, 2, 4, 64]))
    assert torch.allclose(b, torch.tensor([[1.0, 1.9, 3.4, 3.4]]))
    d = choose_width(scores, torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1, 2, 4, 64]))
    # 4 and 64 both mean the full tree with equal objective: the smaller index wins
    assert d.width == 4 and d.width_index == 2 and d.kept.tolist() == [[0, 1, 2]]
    d = choose_width(scores, torch.tensor([5.0, 5.0, 5.0, 1.0]), torch.tensor([1, 2, 4, 64]))
    assert d.width == 4 and d.width_index == 3 and d.kept.shape == (1, 3)


def test_expected_accepted_lengths_values():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.0, 0.0, 0.3]])
    b = expected_accepted_lengths(scores, [1, 2, 3, 4])
    assert torch.allclose(b, torch.tensor([[1.0, 1.9, 2.4, 2.5], [1.0, 1.3, 1.3, 1.3]]))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf"), -0.25])
def test_bad_scores_fall_back_to_full_tree(bad_value):
    gen = torch.Generator().manual_seed(3)
    parents, scores = random_tree(gen, 3, 9, tie_probs=False)
    scores[1, 4] = bad_value
    widths = torch.tensor([1, 2, 4, 8, 10])
    steep = torch.tensor([1.0, 10.0, 20.0, 40.0, 50.0])  # would choose width 1 otherwise
    d = choose_width(scores, steep, widths)
    assert d.fallback.tolist() == [False, True, False]
    assert d.width == 10 and d.width_index == 4
    assert d.kept.shape == (3, 9)
    assert bool(is_ancestor_closed(parents, mask_from_kept(d.kept, 9)).all())
    assert bool(torch.isfinite(d.objective).all()) and bool(torch.isfinite(d.expected_accepted).all())
    # when the largest width is smaller than the tree, the bad row keeps its first nodes by index
    d = choose_width(scores, torch.tensor([1.0, 10.0]), torch.tensor([1, 4]))
    assert d.width == 4 and d.kept[1].tolist() == [0, 1, 2]
    assert bool(is_ancestor_closed(parents, mask_from_kept(d.kept, 9)).all())
    w_r, mask = choose_widths_per_request(scores, steep, widths)
    assert w_r.tolist() == [1, 10, 1]
    assert bool(is_ancestor_closed(parents, mask).all())


def test_sanitize_scores_clamps_and_flags():
    s = torch.tensor([[1.0000002, 0.5, 0.2], [0.3, float("nan"), 0.1]])
    clean, bad = sanitize_scores(s)
    assert bad.tolist() == [False, True]
    assert clean[0].tolist() == pytest.approx([1.0, 0.5, 0.2])
    assert bool((clean[1][:-1] > clean[1][1:]).all())  # strictly decreasing ramp
    assert bool(torch.isfinite(clean).all())
    assert clean.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_scores_give_same_decision(dtype):
    # values exactly representable in all dtypes
    scores = torch.tensor([[1.0, 0.5, 0.25, 0.125, 0.5], [0.75, 0.5, 0.5, 0.0, 0.25]])
    widths = torch.tensor([1, 2, 4, 6])
    cost = torch.tensor([1.0, 1.2, 1.6, 2.5])
    ref = choose_width(scores, cost, widths)
    got = choose_width(scores.to(dtype), cost, widths)
    assert got.width == ref.width and torch.equal(got.kept, ref.kept)
    assert got.objective.dtype == torch.float32


def test_step_cost_and_widths_may_be_lists():
    scores = torch.tensor([[0.9, 0.8]])
    d = choose_width(scores, [1.0, 1.1, 1.2], [1, 2, 3])
    assert d.width == 3


@pytest.mark.parametrize(
    ("cost", "widths", "match"),
    [
        ([1.0], [], "widths is empty"),
        ([1.0, 2.0], [0, 2], ">= 1"),
        ([1.0, 2.0], [2, 1], "ascending"),
        ([1.0, 2.0], [2, 2], "ascending"),
        ([[1.0, 2.0]], [1, 2], "1-D"),
        ([1.0, 2.0], [[1, 2]], "1-D"),
        ([1.0, 2.0, 3.0], [1, 2], "3 entries"),
        ([1.0, 0.0], [1, 2], "positive and finite"),
        ([1.0, -2.0], [1, 2], "positive and finite"),
        ([1.0, float("nan")], [1, 2], "positive and finite"),
        ([1.0, float("inf")], [1, 2], "positive and finite"),
        ([1.0, 2.0], [1.5, 2], "integers"),
    ],
)
def test_configuration_errors_raise(cost, widths, match):
    with pytest.raises(ValueError, match=match):
        choose_width(torch.rand(2, 4), torch.tensor(cost), widths)


def test_scores_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        choose_width(torch.rand(4), [1.0], [1])
    with pytest.raises(ValueError, match="floating"):
        choose_width(torch.ones(2, 4, dtype=torch.long), [1.0], [1])
    with pytest.raises(ValueError, match=">= 1"):
        keep_top(torch.rand(2, 4), 0)


def test_is_ancestor_closed_detects_orphans():
    parents = torch.tensor([[-1, 0, 1, 0], [-1, -1, 0, 2]])
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    assert is_ancestor_closed(parents, mask).tolist() == [False, True]
    validate_parents(parents)
    with pytest.raises(ValueError, match="lower flat index"):
        validate_parents(torch.tensor([[-1, 1]]))


def test_exhaustive_small_trees_all_parent_shapes():
    # every parent structure with K = 4 and a fixed score pattern including ties
    k = 4
    widths = (1, 2, 3, 5)
    for parent_choice in itertools.product(*[range(-1, i) for i in range(k)]):
        parents = torch.tensor([parent_choice])
        probs = [1.0, 0.5, 1.0, 0.9]
        scores = torch.zeros(1, k)
        for i in range(k):
            base = 1.0 if parent_choice[i] < 0 else float(scores[0, parent_choice[i]])
            scores[0, i] = base * probs[i]
        cost = torch.tensor([1.0, 1.3, 1.9, 2.2])
        best, _ = brute_force(parents, scores, cost, widths)
        d = choose_width(scores, cost, torch.tensor(widths))
        assert float(d.objective.max()) == pytest.approx(best, abs=1e-6)
        assert bool(is_ancestor_closed(parents, mask_from_kept(d.kept, k)).all())


def test_degenerate_shapes_do_not_crash():
    # no candidates: only the root can be verified
    d = choose_width(torch.rand(2, 0), [1.0, 2.0], [1, 2])
    assert d.width == 1 and d.kept.shape == (2, 0) and d.fallback.tolist() == [False, False]
    # empty batch
    d = choose_width(torch.rand(0, 5), [1.0, 2.0], [1, 2])
    assert d.kept.shape[0] == 0 and d.fallback.shape == (0,)
    w_r, mask = choose_widths_per_request(torch.rand(0, 5), [1.0, 2.0], [1, 2])
    assert w_r.shape == (0,) and mask.shape == (0, 5)


def test_full_tree_kept_is_every_index():
    scores = torch.rand(3, 6)
    d = choose_width(scores, torch.ones(3), [1, 4, 7])
    assert d.width == 7 and d.kept.tolist() == [list(range(6))] * 3
    assert d.kept.is_contiguous() and d.kept.dtype == torch.long


def test_benefit_matmul_equals_running_sum():
    # the CPU fast path (addmm with a 0/1 prefix matrix) and the GPU path (cumsum) agree
    from evict.truncation.rule import _benefit, _benefit_cumsum, _WidthPlan

    gen = torch.Generator().manual_seed(5)
    for k in (1, 7, 64):
        scores = torch.rand(5, k, generator=gen).sort(dim=-1, descending=True).values
        widths = torch.tensor([1, 2, 3, 8, 33, 65, 100])
        plan = _WidthPlan(widths, k, scores.device)
        a, b = _benefit(scores, plan), _benefit_cumsum(scores, plan)
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.equal(a[:, 0], torch.ones(5))


def test_decision_is_deterministic_and_layout_independent():
    # ranks in a TP/EP group must agree: identical inputs (any memory layout) give identical output
    gen = torch.Generator().manual_seed(9)
    _, scores = random_tree(gen, 6, 12, tie_probs=True)
    strided = scores.t().contiguous().t()  # same values, non-contiguous
    cost, widths = torch.tensor([1.0, 1.05, 1.1, 1.3]), torch.tensor([1, 3, 6, 13])
    a = choose_width(scores, cost, widths)
    b = choose_width(strided, cost, widths)
    c = choose_width(scores.clone(), cost, widths)
    for d in (b, c):
        assert d.width == a.width and torch.equal(d.kept, a.kept)
        assert torch.equal(d.objective, a.objective)


def test_checks_are_on_by_default_and_the_unchecked_path_gives_the_same_values():
    """Mutation testing found the default ``check=True`` of these two entry points untested: an
    unchecked call would take descending or zero widths silently."""

    scores = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.2, 0.1]])
    for bad in ([4, 2], [0, 2]):
        with pytest.raises(ValueError, match="widths"):
            expected_accepted_lengths(scores, bad)
        with pytest.raises(ValueError, match="widths"):
            choose_widths_per_request(scores, [1.0, 2.0], bad)
    widths = torch.tensor([1, 2, 4])
    checked = expected_accepted_lengths(scores, widths)
    assert torch.equal(expected_accepted_lengths(scores, widths, check=False), checked)
    assert torch.allclose(checked, torch.tensor([[1.0, 1.9, 2.6], [1.0, 1.3, 1.6]]))
    cost = torch.tensor([1.0, 1.5, 2.5])
    w_checked, _ = choose_widths_per_request(scores, cost, widths)
    w_unchecked, _ = choose_widths_per_request(scores, cost, widths, check=False)
    assert torch.equal(w_checked, w_unchecked)
