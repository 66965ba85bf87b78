"""Drafting inside the engine equals a cache-free recomputation of every draft node.

Greedy losslessness cannot see drafting bugs (a wrong draft is just rejected), so this checks the
drafter's KV cache use, tree masks, positions and the draft extend directly: every candidate's
score must be the product, along its path, of the drafter probabilities obtained by running the
drafter without any cache over (extend entries of the context) + (the node's ancestor chain),
with the hidden state of each chain entry fed back from its parent -- the EAGLE-3 recurrence.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import random_pair

import evict.engine.engine as engine_mod
from evict.engine import SpecEngine


def reference_scores(target, drafter, context: list[int], tree) -> torch.Tensor:
    """Recompute the [K] scores of one request's tree; ``context`` ends with the root token."""
    n = len(context)
    ids = torch.tensor([context])
    with torch.inference_mode():
        aux = target(ids[:, :-1], torch.arange(n - 1).view(1, -1), None).aux_hidden  # [1, n-1, 3H]
        base_tokens = ids[:, 1:]  # extend entries: (token j+1, aux j) at position j
        base_hidden = drafter.project(aux)
        memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # flat idx -> (probs after, hidden)

        def run(chain_tokens: list[int], chain_hidden: list[torch.Tensor]):
            toks = torch.cat([base_tokens, torch.tensor([chain_tokens], dtype=torch.long)], 1)
            hid = torch.cat([base_hidden, *[h.view(1, 1, -1) for h in chain_hidden]], 1)
            logits, hout = drafter(toks, hid, torch.arange(toks.shape[1]).view(1, -1), None)
            return torch.softmax(logits[0, -1], -1), hout[0, -1]

        def chain_of(f: int) -> list[int]:
            path = []
            while f >= 0:
                path.append(f)
                f = int(tree.parents[f])
            return path[::-1]

        root_logits, root_hidden = drafter(base_tokens, base_hidden, torch.arange(n - 1).view(1, -1), None)
        root = (torch.softmax(root_logits[0, -1], -1), root_hidden[0, -1])
        t2d = {int(drafter.draft_to_target(torch.tensor(i))): i for i in range(drafter.d2t.numel())}
        scores = torch.zeros(tree.scores.shape[0], dtype=torch.float64)
        for f in range(tree.scores.shape[0]):
            path = chain_of(f)
            prob, hidden_stack, toks = 1.0, [], []
            dist, h = root
            for node in path:
                prob *= float(dist[t2d[int(tree.tokens[node])]])
                toks.append(int(tree.tokens[node]))
                hidden_stack.append(h)
                if node not in memo:
                    memo[node] = run(toks, hidden_stack)
                dist, h = memo[node]
            scores[f] = prob
    return scores


@pytest.mark.parametrize("steps,topk", [(3, 2), (4, 1), (2, 3)])
def test_draft_tree_matches_cache_free_recomputation(monkeypatch, steps, topk):
    target, drafter = random_pair(3)
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8]]  # different lengths: padding and per-request masks
    trees = []
    real = engine_mod.draft_tree

    def recording(*a, **kw):
        t = real(*a, **kw)
        trees.append(t)
        return t

    monkeypatch.setattr(engine_mod, "draft_tree", recording)
    engine = SpecEngine(target, drafter, mode="static", steps=steps, topk=topk, num_draft_tokens=None)
    res = engine.generate(prompts, 6)
    # step 0 drafts after the prefill; step 1 after one verify + draft extend
    for step in (0, 1):
        tree = trees[step]
        for b, p in enumerate(prompts):
            done = 1 + (res.steps[0].emitted[b] if step == 1 else 0)
            context = p + res.tokens[b][:done]
            want = reference_scores(target, drafter, context, _row(tree, b))
            got = tree.scores[b].double()
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (step, b, (got - want).abs().max())


def _row(tree, b: int):
    class Row:
        scores = tree.scores[b]
        tokens = tree.tokens[b]
        parents = tree.parents[b]

    return Row
