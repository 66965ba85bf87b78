"""Seeded empirical check of sampling losslessness on the real engine (never flakes: fixed seed).

Thousands of copies of one prompt are decoded in one batch; the first three new tokens are
compared, each conditionally on the tokens before it, with the target's exact distribution
(temperature, top-p) by a pooled chi-square test. Token 1 comes from the prefill; tokens 2 and 3
come from tree verification (accepted children, residual draws and the next step after the
draft extend). The same statistic against a slightly wrong distribution must fail, so the test
has power.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from engine_fixtures import oracle_pair

from evict.engine import SpecEngine, target_probs
from evict.truncation import AcceptanceEstimator, TruncationPolicy

PROMPT = [1, 2, 3, 4]
COPIES = 2000
TEMP, TOP_P = 1.5, 0.95


def conditional_probs(target, prefixes: list[tuple[int, ...]], temperature: float, top_p: float):
    """Exact target sampling distribution after PROMPT + prefix, for each prefix (batched by length)."""
    out = {}
    with torch.inference_mode():
        for n in sorted({len(p) for p in prefixes}):
            group = [p for p in prefixes if len(p) == n]
            ids = torch.tensor([PROMPT + list(p) for p in group])
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            probs = target_probs(target(ids, pos, None).logits[:, -1], temperature, top_p).double()
            out.update(zip(group, probs))
    return out


def pooled_chi_square(samples: list[list[int]], probs_of, depth: int) -> tuple[float, int]:
    """Chi-square of token ``depth`` given tokens before it, pooled over prefixes."""
    groups: dict[tuple[int, ...], Counter] = {}
    for s in samples:
        if len(s) > depth:
            groups.setdefault(tuple(s[:depth]), Counter())[s[depth]] += 1
    stat, bins, n_groups = 0.0, 0, 0
    for pre, counts in groups.items():
        n = sum(counts.values())
        if n < 20:
            continue
        p = probs_of[pre]
        big = [y for y in range(p.numel()) if n * float(p[y]) >= 5]
        rest_e = n - sum(n * float(p[y]) for y in big)
        rest_o = n - sum(counts[y] for y in big)
        cells = [(counts[y], n * float(p[y])) for y in big]
        if rest_e >= 1:
            cells.append((rest_o, rest_e))
        elif rest_o > 0:  # a token with (almost) zero target mass was emitted: maximal evidence
            return float("inf"), 1
        stat += sum((o - e) ** 2 / e for o, e in cells)
        bins += len(cells)
        n_groups += 1
    return stat, bins - n_groups


def p_value(stat: float, df: int) -> float:
    if stat == float("inf"):
        return 0.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.fixture(scope="module")
def pair():
    return oracle_pair(0)


@pytest.mark.parametrize("mode", ["static", "evict", "evict-calibrated", "evict-per-request"])
def test_first_tokens_follow_the_target_distribution(pair, mode):
    target, drafter = pair
    # per-request: a batch budget with free padding, so padded slots (root token) really occur
    policy = (
        TruncationPolicy(
            [1.0, 1.35, 1.8, 2.6, 4.0],
            widths=[1, 2, 4, 8, 16],
            per_request=mode == "evict-per-request",
            pad_cost=0.0,
        )
        if "evict" in mode
        else None
    )
    # calibrated: steps 2 and 3 rank the tree by what step 1's (and 2's) coins accepted
    est = AcceptanceEstimator(topk=2, max_depth=3, half_life=512.0) if mode == "evict-calibrated" else None
    engine = SpecEngine(
        target,
        drafter,
        mode=mode.split("-")[0],
        acceptance=est,
        steps=3,
        topk=2,
        num_draft_tokens=None if "evict" in mode else 7,
        policy=policy,
        temperature=TEMP,
        top_p=TOP_P,
        seed=1234,
    )
    res = engine.generate([PROMPT] * COPIES, 3)
    assert res.mean_accepted_length > 1.3  # trees are really accepted, not just the bonus token
    if mode == "evict-per-request":  # some request really kept fewer nodes than the batch width
        assert any(min(s.kept_counts) < s.width - 1 for s in res.steps)
    if est is not None:  # the estimator really learned from the coins of earlier steps
        assert sum(r["trials"] for r in est.reliability()) > 1000
    prefixes = sorted({tuple(s[:d]) for s in res.tokens for d in range(3)})
    probs = conditional_probs(target, prefixes, TEMP, TOP_P)
    for depth in range(3):
        stat, df = pooled_chi_square(res.tokens, probs, depth)
        assert df >= (3 if depth == 0 else 20)
        assert p_value(stat, df) > 1e-3, (depth, stat, df)
    # power: the same samples against a slightly different temperature are rejected
    wrong = conditional_probs(target, prefixes, TEMP * 1.25, TOP_P)
    stat, df = pooled_chi_square(res.tokens, wrong, 1)
    assert p_value(stat, df) < 1e-6


def test_sampling_is_reproducible_and_seed_dependent(pair):
    target, drafter = pair

    def run(seed: int) -> list[list[int]]:
        e = SpecEngine(
            target, drafter, mode="static", steps=3, topk=2, num_draft_tokens=6, temperature=0.8, seed=seed
        )
        return e.generate([PROMPT, [5, 6]], 10).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)
