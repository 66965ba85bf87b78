"""Exact losslessness of the engine's acceptance rules on random trees and random truncations.

The sampling check enumerates the uniform coins instead of sampling them: the acceptance
function is piecewise constant in each coin, with breakpoints among the subset sums of the
current node's child probabilities (tree coins) and among the residual CDF values (final coin).
Evaluating it at the midpoints of those intervals, weighted by interval length, gives the exact
probability of every emitted sequence. Extending each emitted sequence with the target's own
distribution must reproduce the target's joint distribution to 1e-6, for any ancestor-closed
tree -- which is why choosing the tree from drafter-side scores (EVICT) is lossless.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from evict.engine.acceptance import greedy_accept, sampling_accept
from evict.engine.sampling import sample_from_probs, target_probs
from evict.engine.tree_layout import DraftTree, expand_first, expand_next, select_verify_tree
from evict.truncation import is_ancestor_closed, keep_top

V = 6


class SyntheticTarget:
    """A 'language model' over V tokens: a fixed random distribution for every context."""

    def __init__(self, seed: int, temperature: float, top_p: float) -> None:
        self.seed, self.temperature, self.top_p = seed, temperature, top_p
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def probs(self, ctx: tuple[int, ...]) -> torch.Tensor:
        if ctx not in self._cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + ctx) % (2**31))
            logits = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
            self._cache[ctx] = target_probs(logits, self.temperature, self.top_p).double()
        return self._cache[ctx]


def random_tree(gen: torch.Generator, steps: int, topk: int) -> DraftTree:
    """An SGLang-layout draft tree with random drafter distributions over V tokens (bs = 1)."""

    def draft_topk(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.softmax(torch.randn(n, V, generator=gen, dtype=torch.float64) * 2, dim=-1)
        return torch.topk(q, topk, dim=-1)

    p0, i0 = draft_topk(1)
    e = expand_first(p0, i0)
    scores, tokens, parents = [e.scores], [e.tokens], [e.parents]
    for step in range(1, steps):
        p, i = draft_topk(topk)
        e = expand_next(
            step, e.frontier_scores, e.frontier_flat, p.view(1, topk, topk), i.view(1, topk, topk)
        )
        scores.append(e.scores)
        tokens.append(e.tokens)
        parents.append(e.parents)
    return DraftTree(torch.cat(scores, 1), torch.cat(tokens, 1), torch.cat(parents, 1))


def node_contexts(tokens: torch.Tensor, parent: torch.Tensor) -> list[tuple[int, ...]]:
    """Token path (root excluded) leading to each verify node of a bs=1 tree."""
    ctx: list[tuple[int, ...]] = []
    for j in range(tokens.shape[1]):
        p = int(parent[0, j])
        ctx.append(() if p < 0 else ctx[p] + (int(tokens[0, j]),))
    return ctx


def _intervals(points: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    pts = sorted({0.0, 1.0, *[min(max(x, 0.0), 1.0) for x in points]})
    lo = torch.tensor(pts[:-1], dtype=torch.float64)
    hi = torch.tensor(pts[1:], dtype=torch.float64)
    keep = hi - lo > 1e-15
    return ((lo + hi) / 2)[keep], (hi - lo)[keep]


def exact_emission_distribution(tokens, parent, probs) -> dict[tuple[int, ...], float]:
    """P(emitted sequence) of :func:`sampling_accept` by enumerating coin intervals (bs = 1)."""
    m = tokens.shape[1]
    children = [[c for c in range(m) if int(parent[0, c]) == j] for j in range(m)]
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def run(coin_rows: torch.Tensor, finals: torch.Tensor):
        n = coin_rows.shape[0]
        return sampling_accept(
            tokens.expand(n, m), parent.expand(n, m), probs.expand(n, *probs.shape[1:]), coin_rows, finals
        )

    def rec(fixed: dict[int, float], weight: float) -> None:
        base = torch.full((1, m), 0.5, dtype=torch.float64)
        for j, u in fixed.items():
            base[0, j] = u
        res = run(base, torch.full((1,), 0.5, dtype=torch.float64))
        path = [int(x) for x in res.path[0] if int(x) >= 0]
        free = [j for j in path if j not in fixed]
        if free:
            node = free[0]
            ps = [float(probs[0, node, int(tokens[0, c])]) for c in children[node]]
            sums = [sum(s) for r in range(len(ps) + 1) for s in itertools.combinations(ps, r)]
            mids, lens = _intervals(sums)
            coins = base.repeat(mids.numel(), 1)
            coins[:, node] = mids
            r = run(coins, torch.full((mids.numel(),), 0.5, dtype=torch.float64))
            groups: dict[int, tuple[float, float]] = {}
            pos = path.index(node)
            for i in range(mids.numel()):
                nxt = int(r.path[i, pos + 1]) if pos + 1 < m else -1
                rep, w = groups.get(nxt, (float(mids[i]), 0.0))
                groups[nxt] = (rep, w + float(lens[i]))
            for rep, w in groups.values():
                rec({**fixed, node: rep}, weight * w)
            return
        last = path[-1]
        kids = [int(tokens[0, c]) for c in children[last]]
        resid = probs[0, last].clone()
        for t in kids:
            resid[t] = 0
        cdf = (resid.cumsum(0) / resid.sum()).tolist() if float(resid.sum()) > 0 else []
        mids, lens = _intervals(cdf)
        r = run(base.repeat(mids.numel(), 1), mids)
        for i in range(mids.numel()):
            seq = tuple(int(x) for x in r.emitted[i] if int(x) >= 0)
            out[seq] += weight * float(lens[i])

    rec({}, 1.0)
    return out


def extended_joint(emit: dict[tuple[int, ...], float], target: SyntheticTarget, depth: int) -> torch.Tensor:
    """Joint of the first ``depth`` tokens: emitted prefix, then the target continues."""
    joint = torch.zeros([V] * depth, dtype=torch.float64)
    for seq, pe in emit.items():
        seq = seq[:depth]

        def extend(prefix: tuple[int, ...], w: float) -> None:
            if len(prefix) == depth:
                joint[prefix] += w
                return
            p = target.probs(prefix)
            for y in range(V):
                if p[y] > 0:
                    extend(prefix + (y,), w * float(p[y]))

        extend(seq, pe)
    return joint


def target_joint(target: SyntheticTarget, depth: int) -> torch.Tensor:
    joint = torch.zeros([V] * depth, dtype=torch.float64)
    for seq in itertools.product(range(V), repeat=depth):
        w = 1.0
        for i in range(depth):
            w *= float(target.probs(seq[:i])[seq[i]])
        joint[seq] = w
    return joint


CASES = [
    # (seed, steps, topk, temperature, top_p)
    (0, 1, 3, 1.0, 1.0),
    (1, 2, 2, 1.0, 1.0),
    (2, 3, 2, 0.7, 1.0),
    (3, 2, 3, 1.3, 0.8),
    (4, 3, 1, 1.0, 0.9),
    (5, 3, 3, 1.0, 1.0),
]


@pytest.mark.parametrize("seed,steps,topk,temperature,top_p", CASES)
def test_sampling_acceptance_is_exact_for_any_truncation(seed, steps, topk, temperature, top_p):
    gen = torch.Generator().manual_seed(seed)
    target = SyntheticTarget(seed, temperature, top_p)
    tree = random_tree(gen, steps, topk)
    k_total = tree.scores.shape[1]
    widths = sorted({1, 2, k_total + 1, int(torch.randint(1, k_total + 2, (1,), generator=gen))})
    # top-m prefixes (what EVICT keeps) and one arbitrary ancestor-closed subset (lossless too)
    kept_sets = [keep_top(tree.scores.float(), m) for m in widths]
    pick = set()
    for f in torch.randperm(k_total, generator=gen)[: max(1, k_total // 3)].tolist():
        while f >= 0 and f not in pick:
            pick.add(f)
            f = int(tree.parents[0, f])
    kept_sets.append(torch.tensor([sorted(pick)]))
    for kept in kept_sets:
        m = kept.shape[1] + 1
        mask = torch.zeros_like(tree.parents, dtype=torch.bool).scatter(1, kept, True) if m > 1 else None
        if mask is not None:
            assert bool(is_ancestor_closed(tree.parents, mask).all())
        root = torch.zeros(1, dtype=torch.long)
        vt = select_verify_tree(tree, kept, root)
        ctx = node_contexts(vt.tokens, vt.parent)
        probs = torch.stack([target.probs(c) for c in ctx]).unsqueeze(0)  # [1, m, V]
        emit = exact_emission_distribution(vt.tokens, vt.parent, probs)
        assert abs(sum(emit.values()) - 1.0) < 1e-9
        depth = int(vt.depth.max()) + 1  # longest possible emission
        got = extended_joint(emit, target, depth)
        want = target_joint(target, depth)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (m, (got - want).abs().max())
        # first emitted token alone: exactly the target's root distribution
        first = got.reshape(V, -1).sum(dim=1)
        assert torch.allclose(first, target.probs(()), atol=1e-6, rtol=0)


def test_exactness_check_detects_a_biased_rule():
    """The enumeration must be able to fail: accepting with prob p(x)/q instead of p breaks it."""
    gen = torch.Generator().manual_seed(7)
    target = SyntheticTarget(7, 1.0, 1.0)
    tree = random_tree(gen, 1, 3)
    vt = select_verify_tree(tree, keep_top(tree.scores.float(), 4), torch.zeros(1, dtype=torch.long))
    ctx = node_contexts(vt.tokens, vt.parent)
    probs = torch.stack([target.probs(c) for c in ctx]).unsqueeze(0)
    # a wrong rule: verify against a sharpened distribution but emit as if it were the target
    wrong = probs.clone()
    wrong[0, 0] = torch.softmax(torch.log(probs[0, 0]) * 2, dim=-1)
    emit = exact_emission_distribution(vt.tokens, vt.parent, wrong)
    first = extended_joint(emit, target, 1)
    assert not torch.allclose(first, target.probs(()), atol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_acceptance_emits_the_target_argmax_chain(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    target = SyntheticTarget(100 + seed, 1.0, 1.0)
    tree = random_tree(gen, 3, 2)
    for m in (1, 3, tree.scores.shape[1] + 1):
        vt = select_verify_tree(tree, keep_top(tree.scores.float(), m), torch.zeros(1, dtype=torch.long))
        ctx = node_contexts(vt.tokens, vt.parent)
        pred = torch.stack([target.probs(c).argmax() for c in ctx]).view(1, -1)
        res = greedy_accept(vt.tokens, vt.parent, pred)
        emitted = [int(x) for x in res.emitted[0] if int(x) >= 0]
        chain: list[int] = []
        for _ in range(len(emitted)):
            chain.append(int(target.probs(tuple(chain)).argmax()))
        assert emitted == chain
        # greedy accepts as far as the tree contains the argmax chain
        in_tree = set(ctx)
        longest = max(len(c) for c in in_tree if c == tuple(chain[: len(c)]))
        assert int(res.num_accepted[0]) == longest


def test_target_probs_top_p_and_inverse_cdf():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    p = target_probs(logits, 1.0, 0.7)
    full = torch.softmax(logits, -1)[0]
    # descending: 4 (0.63), 0 (0.23) -> mass before token 0 is 0.63 < 0.7, before token 1 is 0.87
    assert p[0, 1] == 0 and p[0, 2] == 0 and p[0, 3] == 0
    assert torch.allclose(p[0, [4, 0]], full[[4, 0]] / full[[4, 0]].sum())
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]]).repeat(4, 1)
    got = sample_from_probs(probs, torch.tensor([0.0, 0.2, 0.3, 1.0]))
    assert got.tolist() == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="temperature"):
        target_probs(logits, 0.0)


def test_zero_probability_child_is_never_accepted_even_with_coin_zero():
    tokens = torch.tensor([[0, 1, 2]])
    parent = torch.tensor([[-1, 0, 0]])
    probs = torch.zeros(1, 3, V, dtype=torch.float64)
    probs[0, :, 2] = 0.5
    probs[0, :, 3] = 0.5  # token 1 (first child) has no target mass
    res = sampling_accept(tokens, parent, probs, torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1))
    assert res.path[0].tolist()[:2] == [0, 2]  # skips child 1, accepts child 2 (token 2)
    assert int(res.emitted[0, 0]) == 2
