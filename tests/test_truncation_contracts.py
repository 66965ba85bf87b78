"""Contracts of the truncation rule that mutation testing (docs/mutation.md) found unchecked.

The error messages name the problem and the fix; widths and step costs come back in the dtypes
the rest of the rule relies on; the replacement ramp of a bad row has exact values; ties keep the
lower flat index even on inputs where torch's default (unstable) sort would reorder them; the
per-(K, device) caches are reused, bounded and keyed by device; and every tensor the rule builds
lives on the scores' device. The ``meta`` device stands in for a GPU there: it runs the non-CPU
code path (the running-sum benefit) and any tensor created on the CPU by mistake makes it fail.
"""

from __future__ import annotations

import pytest
import torch

from evict.truncation import (
    choose_width,
    choose_widths_per_request,
    expected_accepted_lengths,
    is_ancestor_closed,
    keep_top,
    rule,
    sanitize_scores,
    sort_candidates,
)
from evict.truncation.rule import validate_step_cost, validate_widths

# ---------------------------------------------------------------------------------------------
# Configuration errors: the message names the problem and the fix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        (["a", "b"], r"^widths must be a 1-D sequence of ints, got \['a', 'b'\]$"),
        (torch.tensor([True]), r"^widths must be integers, got dtype torch\.bool$"),
        (torch.tensor([True, False]), r"^widths must be integers, got dtype torch\.bool$"),
        (torch.tensor([1 + 0j, 2 + 0j]), r"^widths must be integers, got dtype torch\.complex64$"),
        (
            [],
            r"^widths is empty: give at least one allowed \(captured\) width, "
            r"e\.g\. \[1, 2, 4, 8, 16, 32, 64\]$",
        ),
    ],
)
def test_bad_widths_are_refused_with_the_reason(widths, match):
    with pytest.raises(ValueError, match=match):
        validate_widths(widths)


def test_step_cost_errors_say_how_to_fix_them():
    with pytest.raises(
        ValueError,
        match=r"^step_cost has 3 entries but there are 2 widths; give one step time per allowed "
        r"width \(CostTable\.step_cost\(bs, widths\) does this\)$",
    ):
        validate_step_cost([1.0, 2.0, 3.0], 2)
    with pytest.raises(
        ValueError,
        match=r"^step_cost must be positive and finite, got \[1\.0, 0\.0\]; check the cost table "
        r"\(regenerate it with `evict-profile --model PATH --out FILE`\)$",
    ):
        validate_step_cost([1.0, 0.0], 2)


def test_scores_that_are_not_a_tensor_are_named():
    with pytest.raises(ValueError, match=r"^scores must be a torch\.Tensor \[bs, K\], got list$"):
        choose_width([[0.5, 0.25]], [1.0, 2.0], [1, 2])


@pytest.mark.parametrize("m", [True, 2.5, 0, -1])
def test_keep_top_refuses_widths_that_are_not_positive_ints(m):
    # True == 1 in Python, but a bool width is a caller bug, not "plain decoding"
    with pytest.raises(ValueError, match="width m must be an int >= 1"):
        keep_top(torch.rand(2, 4), m)


# ---------------------------------------------------------------------------------------------
# Dtypes the rule relies on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths", [torch.tensor([1, 2, 8], dtype=torch.int32), [1.0, 2.0, 8.0], (1, 2, 8)])
def test_widths_come_back_as_long(widths):
    w = validate_widths(widths)
    assert w.dtype == torch.long and w.tolist() == [1, 2, 8]


@pytest.mark.parametrize("cost", [torch.tensor([1.0, 1.5], dtype=torch.float64), [1, 2], (1.0, 1.5)])
def test_step_cost_comes_back_as_float32(cost):
    c = validate_step_cost(cost, 2)
    assert c.dtype == torch.float32
    assert c.tolist() == pytest.approx([float(v) for v in cost])


def test_unchecked_float64_cost_gives_the_checked_decision():
    """``check=False`` (``TruncationPolicy``'s path) converts the cost like the checked path does."""
    scores = torch.tensor([[0.9, 0.6, 0.3], [0.5, 0.4, 0.05]])
    cost = torch.tensor([1.0, 1.2, 1.9], dtype=torch.float64)
    checked = choose_width(scores, cost, [1, 2, 4])
    unchecked = choose_width(scores, cost, [1, 2, 4], check=False)
    assert unchecked.objective.dtype == torch.float32
    assert torch.equal(unchecked.objective, checked.objective)
    assert unchecked.width == checked.width


# ---------------------------------------------------------------------------------------------
# Sanitizing: exact clamp and exact ramp
# ---------------------------------------------------------------------------------------------


def test_scores_above_one_are_clamped_to_exactly_one():
    clean, bad = sanitize_scores(torch.tensor([[1.25, 1.0, 0.5]]))
    assert bad.tolist() == [False]
    assert clean.tolist() == [[1.0, 1.0, 0.5]]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_bad_row_ramp_is_k_down_to_one_over_k_plus_one(k):
    scores = torch.rand(2, k)
    scores[1, 0] = float("nan")
    clean, bad = sanitize_scores(scores)
    assert bad.tolist() == [False, True]
    assert torch.equal(clean[1], torch.arange(k, 0, -1, dtype=torch.float32) / (k + 1))
    # the ramp is cached per (K, device)
    assert rule._ramp(k, torch.device("cpu")) is rule._ramp(k, torch.device("cpu"))
    assert torch.equal(rule._ramp(k, torch.device("cpu")), clean[1])


# ---------------------------------------------------------------------------------------------
# Ties on inputs large enough for torch's unstable sort to reorder them
# ---------------------------------------------------------------------------------------------


def _tie_heavy_tree(seed: int, bs: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random SGLang-layout trees whose edge probabilities are 1, 1/2 or 0: long runs of ties."""
    gen = torch.Generator().manual_seed(seed)
    parents = torch.full((bs, k), -1, dtype=torch.long)
    scores = torch.empty(bs, k)
    probs = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (bs, k), generator=gen)]
    for i in range(k):
        if i > 0:
            parents[:, i] = torch.randint(-1, i, (bs,), generator=gen)
        base = torch.where(
            parents[:, i] < 0, torch.ones(bs), scores.gather(1, parents[:, i : i + 1].clamp(min=0))[:, 0]
        )
        scores[:, i] = base * probs[:, i]
    return parents, scores


def test_sort_is_stable_on_long_runs_of_ties():
    _, scores = _tie_heavy_tree(3, 4, 64)
    sorted_s, order = sort_candidates(scores)
    for r in range(scores.shape[0]):
        row = scores[r].tolist()
        ref = sorted(range(len(row)), key=lambda i: (-row[i], i))
        assert order[r].tolist() == ref
        assert sorted_s[r].tolist() == [row[i] for i in ref]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kept_set_is_ancestor_closed_on_big_tie_heavy_trees(seed):
    parents, scores = _tie_heavy_tree(seed, 4, 64)
    widths = [1, 2, 4, 8, 16, 32, 65]
    for m in widths:
        kept = keep_top(scores, m)
        mask = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, kept, True)
        assert bool(is_ancestor_closed(parents, mask).all())
    for i in range(len(widths)):
        cost = torch.full((len(widths),), 100.0)
        cost[i] = 1.0  # forces width widths[i]
        _, mask = choose_widths_per_request(scores, cost, widths)
        assert bool(is_ancestor_closed(parents, mask).all())
        d = choose_width(scores, cost, widths)
        assert d.width == widths[i]
        dmask = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, d.kept, True)
        assert bool(is_ancestor_closed(parents, dmask).all())


# ---------------------------------------------------------------------------------------------
# The plan cache
# ---------------------------------------------------------------------------------------------


def test_plans_are_reused_and_the_cache_is_bounded():
    cpu = torch.device("cpu")
    w = torch.tensor([1, 2, 4])
    assert rule._get_plan(w, 5, cpu) is rule._get_plan(torch.tensor([1, 2, 4]), 5, cpu)
    assert rule._get_plan(w, 5, cpu) is not rule._get_plan(w, 6, cpu)
    for k in range(rule._MAX_PLANS + 10):
        rule._get_plan(w, 1000 + k, cpu)
        assert len(rule._PLANS) <= rule._MAX_PLANS
    # a cleared cache still gives correct plans
    plan = rule._get_plan(torch.tensor([1, 3, 9]), 5, cpu)
    assert plan.eff_list == [1, 3, 6] and plan.sel.tolist() == [0, 2, 5]
    assert plan.eff_widths.dtype == torch.long and int(plan.last) == 2


# ---------------------------------------------------------------------------------------------
# Device placement (meta stands in for a GPU)
# ---------------------------------------------------------------------------------------------


def test_everything_stays_on_the_scores_device():
    meta = torch.device("meta")
    widths = torch.tensor([1, 2, 4, 9])  # 9 > K + 1: clamped, and the full tree at width 9
    # the same (widths, K) on the CPU first, so a cache keyed without the device would hand the
    # CPU plan and ramp to the meta call
    cpu_b = expected_accepted_lengths(torch.rand(3, 6), widths)
    sanitize_scores(torch.rand(3, 6))
    scores = torch.rand(3, 6, device=meta)
    b = expected_accepted_lengths(scores, widths)
    assert b.device == meta and b.shape == cpu_b.shape == (3, 4) and b.dtype == torch.float32
    clean, bad = sanitize_scores(scores)
    assert clean.device == meta and bad.device == meta and clean.shape == (3, 6)
    for m in (1, 3, 7, 9):  # below, at and beyond the full tree (K + 1 = 7)
        kept = keep_top(scores, m)
        assert kept.device == meta and kept.shape == (3, min(m, 7) - 1)
    plan = rule._get_plan(widths, 6, meta)
    assert plan is not rule._get_plan(widths, 6, torch.device("cpu"))
    for t in (plan.eff_widths, plan.sel, plan.prefix, plan.arange()):
        assert t.device == meta
    assert rule._ramp(6, meta).device == meta


# ---------------------------------------------------------------------------------------------
# Float32 under any default dtype; check=False does no validation work
# ---------------------------------------------------------------------------------------------


def test_sanitized_scores_stay_float32_under_a_float64_default_dtype():
    # K = 37 is used by no other test, so the ramp is built here, under the float64 default
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scores = torch.rand(2, 37, dtype=torch.float32)
        scores[1, 3] = float("inf")
        clean, bad = sanitize_scores(scores)
        assert bad.tolist() == [False, True]
        assert clean.dtype == torch.float32
        assert rule._ramp(37, torch.device("cpu")).dtype == torch.float32
    finally:
        torch.set_default_dtype(old)


def test_unchecked_calls_skip_validation(monkeypatch):
    """``check=False`` is the per-step path of callers that validated once: it must not validate."""

    def refuse(*args, **kwargs):
        raise AssertionError("validated although check=False")

    scores = torch.tensor([[0.9, 0.5, 0.2]])
    expected = expected_accepted_lengths(scores, [1, 2, 4])
    checked = choose_width(scores, [1.0, 1.5, 2.5], [1, 2, 4])
    checked_r, _ = choose_widths_per_request(scores, [1.0, 1.5, 2.5], [1, 2, 4])
    monkeypatch.setattr(rule, "validate_widths", refuse)
    monkeypatch.setattr(rule, "validate_step_cost", refuse)
    assert torch.equal(expected_accepted_lengths(scores, [1, 2, 4], check=False), expected)
    unchecked = choose_width(scores, [1.0, 1.5, 2.5], [1, 2, 4], check=False)
    assert unchecked.width == checked.width and torch.equal(unchecked.objective, checked.objective)
    w_r, _ = choose_widths_per_request(scores, [1.0, 1.5, 2.5], [1, 2, 4], check=False)
    assert torch.equal(w_r, checked_r)
