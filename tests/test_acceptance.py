"""The online acceptance estimator (evict.truncation.acceptance): calibration, decay, bounds,
determinism, ancestor-closed output, warm start and the switch, on synthetic draft trees."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evict.engine.tree_layout import expand_first, expand_next
from evict.truncation import AcceptanceEstimator, flat_outcomes, is_ancestor_closed, keep_top
from evict.truncation.tree import layout_depth_rank

TOPK, STEPS = 2, 3
Q = torch.tensor([0.6, 0.2])  # the drafter's local probabilities of the top two children


def synthetic_tree(bs: int, gen: torch.Generator, jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, parents) of an SGLang-layout tree whose children have local probabilities ~ Q."""

    def local(shape: tuple[int, ...]) -> torch.Tensor:
        noise = (torch.rand(shape + (TOPK,), generator=gen) - 0.5) * jitter
        return (Q + noise).clamp(0.01, 0.99).sort(dim=-1, descending=True).values

    p0 = local((bs,))
    e = expand_first(p0, torch.zeros(bs, TOPK, dtype=torch.long))
    scores, parents = [e.scores], [e.parents]
    for step in range(1, STEPS):
        e = expand_next(
            step, e.frontier_scores, e.frontier_flat, local((bs, TOPK)), torch.zeros(bs, TOPK, TOPK)
        )
        scores.append(e.scores)
        parents.append(e.parents)
    return torch.cat(scores, 1), torch.cat(parents, 1)


def simulate_outcomes(
    parents: torch.Tensor, rates: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """Greedy-like acceptance of the full tree: below an accepted node, its rank-0 child is accepted
    with probability rates[0], else its rank-1 child with probability rates[1] (never both)."""
    bs, k = parents.shape
    _, rank = layout_depth_rank(k, TOPK)
    u = torch.rand(bs, k, generator=gen)  # one coin per parent (column = parent's flat index + 1)
    u = torch.cat([torch.rand(bs, 1, generator=gen), u], dim=1)
    accepted = torch.zeros(bs, k, dtype=torch.bool)
    for i in range(k):  # parents precede children
        par = parents[:, i]
        par_ok = (par < 0) | accepted.gather(1, par.clamp(min=0).view(bs, 1)).view(bs)
        coin = u.gather(1, (par + 1).view(bs, 1)).view(bs)
        lo = 0.0 if int(rank[i]) == 0 else rates[0]
        hi = rates[0] if int(rank[i]) == 0 else rates[0] + rates[1]
        accepted[:, i] = par_ok & (coin >= lo) & (coin < hi)
    return accepted


def run(est: AcceptanceEstimator, steps: int, rates: tuple[float, float], gen: torch.Generator, bs: int = 8):
    recent = est.initial_recent(bs)
    for _ in range(steps):
        scores, parents = synthetic_tree(bs, gen)
        _, feats = est.calibrate(scores, parents, recent)
        accepted = simulate_outcomes(parents, rates, gen)
        verified = torch.ones_like(accepted)
        recent = est.update(feats, verified, accepted, recent)
    return recent


def conditionals(est: AcceptanceEstimator, gen: torch.Generator) -> tuple[float, float]:
    """Mean calibrated conditional of depth-1 rank-0 and rank-1 nodes."""
    scores, parents = synthetic_tree(64, gen)
    _, feats = est.calibrate(scores, parents)
    return float(feats.p[:, 0].mean()), float(feats.p[:, 1].mean())


def test_layout_depth_and_rank():
    depth, rank = layout_depth_rank(2 + 2 * 4, 2)  # steps 3, topk 2: K = 10
    assert depth.tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert rank.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError):
        layout_depth_rank(7, 2)


def test_cold_start_is_the_raw_scores_and_off_is_identity():
    gen = torch.Generator().manual_seed(0)
    scores, parents = synthetic_tree(4, gen, jitter=0.3)
    cal, _ = AcceptanceEstimator(TOPK, STEPS).calibrate(scores, parents)
    torch.testing.assert_close(cal, scores, rtol=1e-5, atol=1e-7)
    off = AcceptanceEstimator(TOPK, STEPS, enabled=False)
    out, feats = off.calibrate(scores, parents)
    assert out is scores and feats is None
    assert (
        off.update(feats, torch.ones(4, 10, dtype=torch.bool), torch.zeros(4, 10, dtype=torch.bool)) is None
    )


def test_converges_to_the_true_acceptance_rate():
    """The drafter says 0.6 / 0.2, the target accepts 0.8 / 0.1: the estimate goes there."""
    gen = torch.Generator().manual_seed(1)
    est = AcceptanceEstimator(TOPK, STEPS, half_life=None)
    run(est, 400, (0.8, 0.1), gen)
    p0, p1 = conditionals(est, gen)
    assert p0 == pytest.approx(0.8, abs=0.03)
    assert p1 == pytest.approx(0.1, abs=0.03)
    for r in est.reliability():  # per depth: calibrated matches realized, raw does not
        assert abs(r["calibrated"] - r["realized"]) < abs(r["raw"] - r["realized"])


def test_old_evidence_decays_after_a_domain_shift():
    gen = torch.Generator().manual_seed(2)
    fast = AcceptanceEstimator(TOPK, STEPS, half_life=256.0)
    slow = AcceptanceEstimator(TOPK, STEPS, half_life=None)
    for est in (fast, slow):
        run(est, 300, (0.8, 0.1), torch.Generator().manual_seed(3))
        run(est, 100, (0.3, 0.1), torch.Generator().manual_seed(4))  # the domain changed
    fast_p0, slow_p0 = conditionals(fast, gen)[0], conditionals(slow, gen)[0]
    assert fast_p0 == pytest.approx(0.3, abs=0.06)
    assert slow_p0 > fast_p0 + 0.1  # without decay the old domain still weighs


def test_state_is_bounded():
    gen = torch.Generator().manual_seed(5)
    est = AcceptanceEstimator(TOPK, STEPS, half_life=128.0)
    sizes = [t.numel() for t in (est.coarse_accepted, est.fine_accepted)]
    recent = run(est, 300, (1.0, 0.0), gen)
    assert [t.numel() for t in (est.coarse_accepted, est.fine_accepted)] == sizes
    # decayed trial mass: at most half_life / ln 2 plus one step's trials (8 rows x 10 nodes)
    assert float(est.coarse_accepted.sum()) <= 128.0 / math.log(2) + 80
    assert bool(((recent >= 0) & (recent <= 1)).all())
    scores, parents = synthetic_tree(8, gen, jitter=0.5)
    cal, feats = est.calibrate(scores, parents, recent)
    assert bool(((feats.p > 0) & (feats.p <= 1)).all())
    assert bool(((cal > 0) & (cal <= 1)).all())


def test_update_is_deterministic():
    a, b = AcceptanceEstimator(TOPK, STEPS), AcceptanceEstimator(TOPK, STEPS)
    ra = run(a, 50, (0.7, 0.2), torch.Generator().manual_seed(6))
    rb = run(b, 50, (0.7, 0.2), torch.Generator().manual_seed(6))
    assert torch.equal(ra, rb)
    for name in ("coarse_accepted", "coarse_expected", "fine_accepted", "fine_expected", "recent_init"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_calibrated_scores_never_grow_parent_to_child_and_cuts_are_ancestor_closed():
    gen = torch.Generator().manual_seed(7)
    for trial in range(20):
        est = AcceptanceEstimator(TOPK, STEPS, prior_strength=0.5)
        # arbitrary learned states, including ratios far above and below 1
        est.coarse_accepted = torch.rand(est.n_coarse, generator=gen, dtype=torch.float64) * 50
        est.coarse_expected = torch.rand(est.n_coarse, generator=gen, dtype=torch.float64) * 50
        est.fine_accepted = torch.rand(est.n_fine, generator=gen, dtype=torch.float64) * 50
        est.fine_expected = torch.rand(est.n_fine, generator=gen, dtype=torch.float64) * 50
        scores, parents = synthetic_tree(6, gen, jitter=1.0)
        if trial % 4 == 0:
            scores[0, 3] = 0.0  # zero-probability nodes
        cal, _ = est.calibrate(scores, parents, torch.rand(6, generator=gen))
        parent_cal = torch.where(parents >= 0, cal.gather(1, parents.clamp(min=0)), torch.ones_like(cal))
        assert bool((cal <= parent_cal).all())
        for m in range(1, cal.shape[1] + 2):
            kept = keep_top(cal, m)
            mask = torch.zeros_like(cal, dtype=torch.bool).scatter_(1, kept, True)
            assert bool(is_ancestor_closed(parents, mask).all())


def test_bad_rows_stay_bad_so_the_rule_still_falls_back():
    gen = torch.Generator().manual_seed(8)
    scores, parents = synthetic_tree(3, gen)
    scores[1, 4] = float("nan")
    scores[2, 0] = float("inf")
    cal, _ = AcceptanceEstimator(TOPK, STEPS).calibrate(scores, parents)
    assert torch.isnan(cal[1, 4]) and torch.isinf(cal[2, 0])
    assert bool(torch.isfinite(cal[0]).all())


def test_flat_outcomes_maps_verify_indices_to_flat_nodes():
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])  # verify indices 1..3
    path = torch.tensor([[0, 2, 3, -1], [0, -1, -1, -1]])  # row 0 accepted flat 2 then 5
    verified, accepted = flat_outcomes(kept, path, 6)
    assert verified.tolist() == [
        [True, False, True, False, False, True],
        [False, True, False, True, True, False],
    ]
    assert accepted.tolist() == [[False, False, True, False, False, True], [False] * 6]


def test_warm_start_from_a_json_prior(tmp_path):
    gen = torch.Generator().manual_seed(9)
    est = AcceptanceEstimator(TOPK, STEPS)
    run(est, 100, (0.8, 0.1), gen)
    path = tmp_path / "prior.json"
    est.save(path)
    assert json.loads(path.read_text())["format"] == "evict-acceptance-prior"
    warm = AcceptanceEstimator(TOPK, STEPS).load(path)
    scores, parents = synthetic_tree(4, gen)
    torch.testing.assert_close(warm.calibrate(scores, parents)[0], est.calibrate(scores, parents)[0])
    with pytest.raises(ValueError, match="same draft tree"):
        AcceptanceEstimator(4, STEPS).load(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="cannot read"):
        AcceptanceEstimator(TOPK, STEPS).load(path)


def test_recent_acceptance_separates_requests():
    """A request whose drafts keep failing gets lower calibrated scores than one whose drafts pass."""
    gen = torch.Generator().manual_seed(10)
    est = AcceptanceEstimator(TOPK, STEPS, half_life=None)
    recent = est.initial_recent(2)
    for _ in range(300):
        scores, parents = synthetic_tree(2, gen)
        _, feats = est.calibrate(scores, parents, recent)
        good = simulate_outcomes(parents[:1], (0.9, 0.05), gen)
        bad = simulate_outcomes(parents[1:], (0.2, 0.05), gen)
        accepted = torch.cat([good, bad])
        recent = est.update(feats, torch.ones_like(accepted), accepted, recent)
    assert float(recent[0]) > 0.7 > 0.4 > float(recent[1])
    scores, parents = synthetic_tree(2, gen)
    scores[1] = scores[0]
    parents[1] = parents[0]
    _, feats = est.calibrate(scores, parents, recent)
    assert float(feats.p[0, 0]) > float(feats.p[1, 0]) + 0.3
