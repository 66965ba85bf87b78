"""Greedy losslessness: every mode emits exactly target-only greedy decoding, token for token.

Batched (bs = 3, prompts of different lengths), on two tiny random pairs: one where attention is
at full strength (catches any KV-cache / mask bug, drafts mostly rejected) and one where drafts
are mostly right (deep accepted paths, rejections, intermediate EVICT widths). Optionally on the
shipped testbed pair when its weights are present.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import greedy_reference, oracle_pair, random_pair

from evict.engine import SpecEngine
from evict.truncation import AcceptanceEstimator, TruncationPolicy

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 3, 3]]
NEW = 14

# Step costs that make EVICT pick intermediate widths on the oracle pair (checked below).
WIDTHS = [1, 2, 4, 8, 16]
STAIRCASE = [1.0, 1.35, 1.8, 2.6, 4.0]


@pytest.fixture(scope="module", params=["random", "oracle"])
def pair_and_reference(request):
    target, drafter = random_pair(0) if request.param == "random" else oracle_pair(0)
    ref = [greedy_reference(target, p, NEW) for p in PROMPTS]
    return request.param, target, drafter, ref


STATIC = [(1, 1, 2), (3, 1, 4), (3, 2, 6), (4, 2, 10), (2, 4, 21), (4, 3, None)]


@pytest.mark.parametrize("steps,topk,n", STATIC)
def test_static_trees_match_target_greedy(pair_and_reference, steps, topk, n):
    kind, target, drafter, ref = pair_and_reference
    res = SpecEngine(target, drafter, mode="static", steps=steps, topk=topk, num_draft_tokens=n).generate(
        PROMPTS, NEW
    )
    assert res.tokens == ref
    width = n if n is not None else topk + (steps - 1) * topk * topk + 1
    assert all(s.width == width for s in res.steps)
    if kind == "oracle" and width >= 4:
        assert res.mean_accepted_length > 1.5  # the check really walks deep trees


def test_ar_matches_target_greedy(pair_and_reference):
    _, target, _, ref = pair_and_reference
    res = SpecEngine(target, None, mode="ar").generate(PROMPTS, NEW)
    assert res.tokens == ref
    assert all(s.width == 1 and s.accepted == [1] * len(s.active) for s in res.steps)


@pytest.mark.parametrize(
    "decision_case", ["immediate", "off", "lagged", "immediate+per-request", "off+per-request"]
)
def test_evict_matches_target_greedy(pair_and_reference, decision_case):
    """``+per-request``: per-request widths under a batch budget, padding free (pad_cost 0) so it
    really occurs; padded slots hold the root token and must never be accepted."""
    kind, target, drafter, ref = pair_and_reference
    decision, per_request = decision_case.split("+")[0], decision_case.endswith("+per-request")
    policy = TruncationPolicy(
        STAIRCASE, widths=WIDTHS, decision=decision, per_request=per_request, pad_cost=0.0
    )
    res = SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy).generate(PROMPTS, NEW)
    assert res.tokens == ref
    widths = {s.width for s in res.steps}
    if decision == "off":
        assert widths == {15}  # the largest width (16) clamped to K + 1 = 15: the full tree
    elif kind == "oracle" and decision == "immediate":
        assert any(1 < w < 15 for w in widths), widths  # intermediate widths really occur
    if per_request and decision == "immediate":
        assert any(min(s.kept_counts) < s.width - 1 for s in res.steps)  # padding really occurs


@pytest.mark.parametrize("decision_case", ["immediate", "lagged"])
def test_evict_with_acceptance_estimator_matches_target_greedy(pair_and_reference, decision_case):
    """Calibrated scores (learned from past outcomes, across generate calls) change the cut, never the text."""
    kind, target, drafter, ref = pair_and_reference
    policy = TruncationPolicy(STAIRCASE, widths=WIDTHS, decision=decision_case)
    est = AcceptanceEstimator(topk=2, max_depth=4, prior_strength=2.0, half_life=64.0)
    engine = SpecEngine(target, drafter, mode="evict", steps=4, topk=2, policy=policy, acceptance=est)
    for _ in range(3):  # the estimator keeps learning across calls
        res = engine.generate(PROMPTS, NEW)
        assert res.tokens == ref
    assert sum(r["trials"] for r in est.reliability()) > 20  # it really saw outcomes
    if kind == "oracle":  # and they moved its estimate away from the raw drafter
        assert any(abs(r["calibrated"] - r["raw"]) > 0.05 for r in est.reliability())


def test_oracle_cut_matches_target_greedy(pair_and_reference):
    _, target, drafter, ref = pair_and_reference
    res = SpecEngine(target, drafter, mode="oracle", steps=4, topk=2).generate(PROMPTS, NEW)
    assert res.tokens == ref
    full = SpecEngine(target, drafter, mode="static", steps=4, topk=2).generate(PROMPTS, NEW)
    # the oracle accepts what the full tree accepts while verifying only the longest path
    assert res.mean_accepted_length == pytest.approx(full.mean_accepted_length)
    for s in res.steps:
        assert s.width == max(s.accepted)
    assert res.lookahead_s > 0


def test_evict_steep_cost_degrades_to_plain_decoding(pair_and_reference):
    _, target, drafter, ref = pair_and_reference
    policy = TruncationPolicy([1.0, 10.0, 20.0, 40.0, 80.0], widths=WIDTHS)
    res = SpecEngine(target, drafter, mode="evict", steps=3, topk=2, policy=policy).generate(PROMPTS, NEW)
    assert res.tokens == ref
    assert {s.width for s in res.steps} == {1}


def test_eos_and_max_new_tokens_per_request(pair_and_reference):
    _, target, drafter, ref = pair_and_reference
    eos = ref[0][3]  # a token request 0 emits early
    want = [greedy_reference(target, p, NEW, eos=eos) for p in PROMPTS]
    res = SpecEngine(
        target, drafter, mode="static", steps=3, topk=2, num_draft_tokens=6, eos_token_id=eos
    ).generate(PROMPTS, NEW)
    assert res.tokens == want
    assert res.finish_reasons[0] == "eos"
    for toks, reason in zip(res.tokens, res.finish_reasons):
        assert reason == ("eos" if toks[-1] == eos else "length")
        assert len(toks) <= NEW
    # requests leave the active set once finished
    n_active = [len(s.active) for s in res.steps]
    assert n_active == sorted(n_active, reverse=True)


@pytest.mark.parametrize("testbed", ["moe32", "moe128"])
def test_shipped_testbed_pair_matches_target_greedy(testbed):
    models = pytest.importorskip("evict.models")
    try:
        target, drafter, tok = models.load_testbed(name=testbed)
    except FileNotFoundError:
        pytest.skip("testbed weights not shipped in this checkout")
    prompts = [[int(i) for i in tok.encode(t)] for t in ("import os\n", "def main(args):\n    ")]
    ref = [greedy_reference(target, p, 12) for p in prompts]
    policy = TruncationPolicy(STAIRCASE, widths=WIDTHS)
    for engine in (
        SpecEngine(target, drafter, mode="static", steps=4, topk=4, num_draft_tokens=16),
        SpecEngine(target, drafter, mode="evict", steps=4, topk=4, num_draft_tokens=16, policy=policy),
        SpecEngine(target, None, mode="ar"),
    ):
        res = engine.generate(prompts, 12)
        assert res.tokens == ref
        if engine.mode == "static":
            assert res.mean_accepted_length > 1.5  # the trained drafter is really accepted
    assert torch.is_grad_enabled()  # generate must not leak inference mode
